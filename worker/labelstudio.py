"""What the workers ask of the Label Studio API, through ``label-studio-sdk``'s client.

The SDK client takes a legacy token or a personal access token (it exchanges a PAT for
short-lived access tokens itself) and only ever talks to ``LABEL_STUDIO_URL``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class LabelStudioUnavailable(RuntimeError):
    """No LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY configured for the workers."""


def plain_json(value: Any) -> Any:
    """Result items with numpy arrays (brush RLE) -> plain JSON values for the API client."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, dict):
        return {key: plain_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class LabelStudioApi:
    """Predictions written back, tasks and annotations read, for one LS instance."""

    def __init__(self, url: str, api_key: str, timeout: float = 60.0) -> None:
        if not url or not api_key:
            raise LabelStudioUnavailable(
                "set LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY for the workers: they write "
                "batch predictions and read annotations through the Label Studio API"
            )
        from label_studio_sdk import LabelStudio

        self.url = url.rstrip("/")
        self.client = LabelStudio(base_url=self.url, api_key=api_key, timeout=timeout)

    def prediction_exists(self, task: int, model_version: str) -> bool:
        """Whether the task already has a prediction of ``model_version`` (LS's own rule for
        not asking again; also what makes a retried job write nothing twice)."""
        for prediction in self.client.predictions.list(task=task):
            if prediction.model_version == model_version:
                return True
        return False

    def create_prediction(
        self, task: int, result: list[dict], score: float, model_version: str
    ) -> int:
        prediction = self.client.predictions.create(
            task=task, result=plain_json(result), score=score, model_version=model_version
        )
        return int(prediction.id)

    def project(self, project: int) -> Any:
        return self.client.projects.get(id=project)

    def tasks(self, project: int, fields: str = "all", page_size: int = 100) -> Iterator[dict]:
        """Every task of a project as a plain dict (with annotations and predictions)."""
        for task in self.client.tasks.list(project=project, fields=fields, page_size=page_size):
            yield task.model_dump(mode="json") if hasattr(task, "model_dump") else dict(task)
