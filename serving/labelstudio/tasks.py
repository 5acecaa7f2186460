"""Label Studio tasks, projects and webhook bodies -> plain values (no torch, no I/O)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from serving.labelstudio.context import (
    MAX_IMAGE_PIXELS,
    PromptError,
    check_image_size,
    rectangle_box,
)
from serving.labelstudio.label_config import ProjectConfig

_PROJECT = re.compile(r"^\d+$")


class TaskError(ValueError):
    """A task LS sent that cannot be served (no image URL, ...); answered with ``status``."""

    status = 422


def project_id(value: object) -> str | None:
    """LS's project reference -> its id as a string: ``"7.1795532368"`` (the /setup and /predict
    form: id.created-at), ``7``, ``{"id": 7, ...}`` (webhooks). None when there is none."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip().split(".", 1)[0]
    return text if _PROJECT.match(text) else None


def image_url(task: dict, config: ProjectConfig) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError(f"task {task.get('id')}: 'data' must be an object")
    url = data.get(config.image_data_key)
    if not isinstance(url, str) or not url.strip():
        raise TaskError(f"task {task.get('id')} has no data.{config.image_data_key}")
    return url


@dataclass(frozen=True)
class BoxItem:
    box: tuple[float, float, float, float]  # pixels of ``size``
    size: tuple[int, int]  # (width, height) the box's percentages refer to
    label: str | None


def task_rectangles(
    task: dict, image_name: str, max_pixels: int = MAX_IMAGE_PIXELS
) -> list[BoxItem]:
    """Rectangles of a task's latest annotation that has some, else of its latest prediction.
    Raises PromptError when a rectangle's image size is over ``max_pixels``."""
    for source in ("annotations", "predictions"):
        entries = [e for e in task.get(source) or [] if isinstance(e, dict)]
        entries = [e for e in entries if not e.get("was_cancelled")]
        entries.sort(
            key=lambda e: (str(e.get("updated_at") or e.get("created_at") or ""), e.get("id") or 0),
            reverse=True,
        )
        for entry in entries:
            boxes = []
            for item in entry.get("result") or []:
                if not isinstance(item, dict) or item.get("type") != "rectanglelabels":
                    continue
                if item.get("to_name") not in (None, image_name):
                    continue
                width, height = item.get("original_width"), item.get("original_height")
                if not (
                    isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0
                ):
                    continue
                check_image_size(width, height, max_pixels)
                value = item.get("value")
                if not isinstance(value, dict):
                    raise PromptError("rectangle has no 'value' object")
                labels = value.get("rectanglelabels") or value.get("labels")
                label = labels[0] if isinstance(labels, list) and labels else None
                boxes.append(
                    BoxItem(
                        rectangle_box(value, width, height),
                        (width, height),
                        label if isinstance(label, str) else None,
                    )
                )
            if boxes:
                return boxes
    return []


# LS actions that carry annotations (ANNOTATIONS_CREATED: lists, from bulk creation).
ANNOTATION_ACTIONS = ("ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED")
DELETE_ACTION = "ANNOTATIONS_DELETED"


def annotation_events(payload: dict) -> tuple[list[dict], list[int]]:
    """An LS webhook body -> (annotations created/updated as events, ids deleted).

    An event is ``{"id", "task", "updated_at", "cancelled"}``; skipped tasks (``was_cancelled``)
    are recorded as cancelled (they never count as training data)."""
    action = payload.get("action")
    if action == DELETE_ACTION:
        deleted = _objects(payload.get("annotations"))
        return [], [a["id"] for a in deleted if _is_id(a.get("id"))]
    if action not in ANNOTATION_ACTIONS:
        return [], []
    annotations = _objects(payload.get("annotation") or payload.get("annotations"))
    events = []
    for annotation in annotations:
        if not _is_id(annotation.get("id")):
            continue
        task = annotation.get("task")
        if isinstance(task, dict):
            task = task.get("id")
        events.append(
            {
                "id": int(annotation["id"]),
                "task": task,
                "updated_at": annotation.get("updated_at") or annotation.get("created_at"),
                "cancelled": bool(annotation.get("was_cancelled")),
            }
        )
    return events, []


def _objects(value: object) -> list[dict]:
    """The objects of a webhook field that holds one object or a list of them."""
    items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
    return [item for item in items if isinstance(item, dict)]


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63
