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
        """Every task of a project as a plain dict (``fields="all"``: with annotations and
        predictions; ``"task_only"``: neither). One page (``page_size`` tasks) held at a time."""
        from label_studio_sdk.errors import NotFoundError

        seen, page = 0, 1
        while True:
            try:
                pager = self.client.tasks.list(
                    project=project, fields=fields, page=page, page_size=page_size
                )
            except NotFoundError:  # Django REST framework's answer to a page past the end
                return
            items = pager.items or []
            for task in items:
                yield _plain(task)
            seen += len(items)
            total = getattr(pager.response, "total", None)
            if not items or (isinstance(total, int) and seen >= total):
                return
            page += 1

    def annotated_tasks(self, project: int, page_size: int = 100) -> Iterator[dict]:
        """Every task with annotations as ``{"id", "data", "annotations"}``, without predictions:
        the task list without annotations, then each annotated task's annotations (a project's
        predictions, often larger than all else, are never downloaded)."""
        for task in self.tasks(project, fields="task_only", page_size=page_size):
            if task.get("total_annotations") == 0:  # LS's count, skipped ones (cancelled) not in it
                continue
            annotations = self.client.annotations.list(id=int(task["id"]))
            yield {
                "id": task["id"],
                "data": task.get("data") or {},
                "annotations": [_plain(a) for a in annotations],
            }


def _plain(item: Any) -> dict:
    """An SDK model -> a plain JSON dict."""
    return item.model_dump(mode="json") if hasattr(item, "model_dump") else dict(item)
