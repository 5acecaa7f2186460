"""A project's annotations from the Label Studio API -> instance masks for fine-tuning.

Rules: per task, the ground-truth annotation if there is one, else the most recently updated one;
skipped tasks (``was_cancelled``) and empty annotations are ignored. Every brush, bitmask or
polygon region on the project's image is one instance mask, at the annotation's
``original_width`` x ``original_height``. Rectangles are not used: a box says where an object is,
not which pixels are it, and training a mask decoder towards filled boxes would teach it boxes
(the box prompts of training are derived from the masks instead). Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass

import numpy as np

from backend.label_config import ProjectConfig

MASK_TYPES = ("brushlabels", "bitmasklabels", "polygonlabels")
MIN_MASK_PIXELS = 4


@dataclass(frozen=True)
class AnnotatedTask:
    """One task's training data: its image URL and instance masks (H, W) bool."""

    task_id: int
    image_url: str
    annotation_id: int
    updated_at: str
    masks: tuple[np.ndarray, ...]


def chosen_annotation(task: dict) -> dict | None:
    """Ground truth first, else the latest updated; never a skipped (cancelled) one."""
    annotations = [
        a
        for a in task.get("annotations") or []
        if isinstance(a, dict) and not a.get("was_cancelled") and a.get("result")
    ]
    if not annotations:
        return None
    annotations.sort(
        key=lambda a: (
            bool(a.get("ground_truth")),
            str(a.get("updated_at") or a.get("created_at") or ""),
            a.get("id") or 0,
        )
    )
    return annotations[-1]


def region_mask(item: dict) -> np.ndarray | None:
    """An LS result item -> (original_height, original_width) bool mask, None if not a mask."""
    kind = item.get("type")
    width, height = item.get("original_width"), item.get("original_height")
    value = item.get("value") or {}
    if kind not in MASK_TYPES or not isinstance(width, int) or not isinstance(height, int):
        return None
    if kind == "brushlabels":
        from label_studio_sdk.converter.brush import decode_rle

        rle = value.get("rle")
        if isinstance(rle, np.ndarray):  # this backend's own results (tests, predictions)
            rle = rle.tolist()
        if not isinstance(rle, list) or not rle:
            return None
        flat = np.asarray(decode_rle(rle), dtype=np.uint8)
        if flat.size != width * height * 4:
            return None
        return flat.reshape(height, width, 4)[:, :, 3] > 0
    if kind == "bitmasklabels":
        from PIL import Image

        url = value.get("imageDataURL") or ""
        if "," not in url:
            return None
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as image:
            array = np.asarray(image.convert("L").resize((width, height), Image.NEAREST))
        return array > 0
    import cv2

    points = np.asarray(value.get("points") or [], np.float64)
    if points.ndim != 2 or len(points) < 3:
        return None
    pixels = np.round(points * [width / 100.0, height / 100.0]).astype(np.int32)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [pixels], 1)
    return mask > 0


def annotated_task(task: dict, config: ProjectConfig) -> AnnotatedTask | None:
    """The task's instance masks on the project's image, or None when it has none."""
    annotation = chosen_annotation(task)
    url = (task.get("data") or {}).get(config.image_data_key)
    if annotation is None or not isinstance(url, str):
        return None
    masks = []
    for item in annotation["result"]:
        if not isinstance(item, dict) or item.get("to_name") not in (None, config.image_name):
            continue
        mask = region_mask(item)
        if mask is not None and int(mask.sum()) >= MIN_MASK_PIXELS:
            masks.append(mask)
    if not masks:
        return None
    return AnnotatedTask(
        int(task["id"]),
        url,
        int(annotation["id"]),
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        tuple(masks),
    )


def snapshot_hash(tasks: list[AnnotatedTask]) -> str:
    """Identifies the data a version was trained on: tasks, annotations and their update times."""
    rows = sorted((t.task_id, t.annotation_id, t.updated_at, len(t.masks)) for t in tasks)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
