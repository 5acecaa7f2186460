"""A project's annotations from the Label Studio API -> instance masks for fine-tuning.

One annotation per task (:func:`chosen_annotation`), its brush, bitmask and polygon regions as
instance masks (:func:`annotated_task`), read task by task (:func:`sync_annotations`). Torch-free.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from serving.labelstudio.label_config import ProjectConfig

MASK_TYPES = ("brushlabels", "bitmasklabels", "polygonlabels")
MIN_MASK_PIXELS = 4
MAX_MASK_PIXELS = 2**28  # a region claiming more pixels than this is refused, not allocated
BITMASK_SCALE_LIMIT = 4  # a bitmask PNG may have at most 4x the region's pixels (checked first)
MAX_POLYGON_PERCENT = 10_000.0  # polygon coordinates beyond this are refused (int32 pixels)


class AnnotationError(ValueError):
    """A mask region that cannot be decoded; the message says why."""


@dataclass(frozen=True)
class PackedMask:
    """An (H, W) bool mask, 8 pixels a byte (``np.packbits``)."""

    shape: tuple[int, int]
    bits: np.ndarray

    @classmethod
    def pack(cls, mask: np.ndarray) -> PackedMask:
        return cls((int(mask.shape[0]), int(mask.shape[1])), np.packbits(mask, axis=None))

    def unpack(self) -> np.ndarray:
        height, width = self.shape
        return np.unpackbits(self.bits, count=height * width).reshape(height, width).astype(bool)

    @property
    def nbytes(self) -> int:
        return int(self.bits.nbytes)


@dataclass(frozen=True)
class AnnotatedTask:
    """One task's training data: its image URL and instance masks (packed, at the annotation's
    size; :meth:`masks_at` gives them at the size training uses, the downloaded image's)."""

    task_id: int
    image_url: str
    annotation_id: int
    updated_at: str
    masks: tuple[PackedMask, ...]

    def masks_at(self, size: tuple[int, int]) -> list[np.ndarray]:
        """The masks as (H, W) bool at ``size`` = (width, height) pixels (nearest neighbour)."""
        from serving.labelstudio.results import resize_mask

        return [resize_mask(mask.unpack(), size) for mask in self.masks]


def chosen_annotation(task: dict) -> dict | None:
    """Ground truth first, else the latest updated; never a skipped (``was_cancelled``) or
    empty one."""
    entries = task.get("annotations")
    annotations = [
        a
        for a in (entries if isinstance(entries, list) else [])
        if isinstance(a, dict)
        and not a.get("was_cancelled")
        and isinstance(a.get("result"), list)
        and a["result"]
    ]
    if not annotations:
        return None
    annotations.sort(
        key=lambda a: (
            bool(a.get("ground_truth")),
            str(a.get("updated_at") or a.get("created_at") or ""),
            a["id"] if isinstance(a.get("id"), int) else 0,
        )
    )
    return annotations[-1]


def region_mask(item: dict) -> np.ndarray | None:
    """An LS result item -> (original_height, original_width) bool mask; None if it is not a
    mask region; :class:`AnnotationError` if it is one that cannot be decoded."""
    kind = item.get("type")
    if kind not in MASK_TYPES:
        return None
    width, height = item.get("original_width"), item.get("original_height")
    value = item.get("value") or {}
    if not isinstance(width, int) or not isinstance(height, int) or width < 1 or height < 1:
        raise AnnotationError(f"{kind} region without a valid original_width/original_height")
    if width * height > MAX_MASK_PIXELS:
        raise AnnotationError(f"{kind} region of {width}x{height} pixels is too large")
    try:
        if kind == "brushlabels":
            return _brush_mask(value.get("rle"), width, height)
        if kind == "bitmasklabels":
            return _bitmask_mask(value.get("imageDataURL"), width, height)
        return _polygon_mask(value.get("points"), width, height)
    except AnnotationError:
        raise
    except Exception as error:  # whatever a malformed value makes the decoders raise
        raise AnnotationError(f"{kind} region cannot be decoded: {error}") from error


def _brush_mask(rle: object, width: int, height: int) -> np.ndarray:
    from serving.labelstudio.brush import BrushRLEError, decode_alpha

    if not isinstance(rle, (list, np.ndarray)) or len(rle) == 0:
        raise AnnotationError("brushlabels region without an RLE")
    try:  # the header's size is checked against width x height x 4 before decoding
        return decode_alpha(rle, width, height)
    except BrushRLEError as error:
        raise AnnotationError(f"brushlabels region: {error}") from None


def _bitmask_mask(url: object, width: int, height: int) -> np.ndarray:
    from PIL import Image

    if not isinstance(url, str) or "," not in url:
        raise AnnotationError("bitmasklabels region without an image data URL")
    # Image.open reads the header only: the size is checked before anything is decoded.
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1], validate=True))) as image:
        pixels = image.width * image.height
        if pixels > MAX_MASK_PIXELS or pixels > BITMASK_SCALE_LIMIT * width * height:
            raise AnnotationError(
                f"bitmask of {image.width}x{image.height} pixels is too large for a "
                f"{width}x{height} region"
            )
        array = np.asarray(image.convert("L").resize((width, height), Image.NEAREST))
    return array > 0


def _polygon_mask(points: object, width: int, height: int) -> np.ndarray:
    import cv2

    array = np.asarray(points if isinstance(points, list) else [], np.float64)
    if array.ndim != 2 or array.shape[1] != 2 or len(array) < 3 or not np.isfinite(array).all():
        raise AnnotationError("polygonlabels region without 3 or more finite [x, y] points")
    if np.abs(array).max() > MAX_POLYGON_PERCENT:
        raise AnnotationError(f"polygonlabels point beyond +-{MAX_POLYGON_PERCENT} % of the image")
    pixels = np.round(array * [width / 100.0, height / 100.0]).astype(np.int32)
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [pixels], 1)
    return mask > 0


def annotated_task(task: dict, config: ProjectConfig) -> AnnotatedTask | None:
    """The task's instance masks on the project's image, or None when it has none;
    :class:`AnnotationError` when one of its mask regions cannot be decoded.

    Every brush, bitmask or polygon region on the project's image is one instance mask, at the
    annotation's ``original_width`` x ``original_height``. Rectangles are not used: a box says
    where an object is, not which pixels are it, and training a mask decoder towards filled
    boxes would teach it boxes (training derives its box prompts from the masks instead)."""
    annotation = chosen_annotation(task)
    data = task.get("data")
    url = data.get(config.image_data_key) if isinstance(data, dict) else None
    if annotation is None or not isinstance(url, str):
        return None
    if not isinstance(task.get("id"), int) or not isinstance(annotation.get("id"), int):
        raise AnnotationError("task or annotation without an integer id")
    masks = []
    for item in annotation["result"]:
        if not isinstance(item, dict) or item.get("to_name") not in (None, config.image_name):
            continue
        mask = region_mask(item)
        if mask is not None and int(mask.sum()) >= MIN_MASK_PIXELS:
            masks.append(PackedMask.pack(mask))
    if not masks:
        return None
    return AnnotatedTask(
        int(task["id"]),
        url,
        int(annotation["id"]),
        str(annotation.get("updated_at") or annotation.get("created_at") or ""),
        tuple(masks),
    )


def sync_annotations(
    tasks: Iterable[dict], config: ProjectConfig
) -> tuple[list[AnnotatedTask], list[dict]]:
    """LS tasks (read one at a time) -> (the tasks with masks, ``{"task", "reason"}`` of each
    task skipped because a region of its annotation cannot be decoded: skipped, never the run
    failed). Only what training needs is kept per task (image URL, the annotation's id and time,
    masks packed 8 pixels a byte); the task's JSON is dropped as each task is read."""
    kept, skipped = [], []
    for task in tasks:
        if not isinstance(task, dict):
            continue
        try:
            annotated = annotated_task(task, config)
        except AnnotationError as error:
            skipped.append({"task": task.get("id"), "reason": str(error)})
            continue
        if annotated is not None:
            kept.append(annotated)
    return kept, skipped


def snapshot_hash(tasks: list[AnnotatedTask]) -> str:
    """Identifies the data a version was trained on: tasks, annotations and their update times."""
    rows = sorted((t.task_id, t.annotation_id, t.updated_at, len(t.masks)) for t in tasks)
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
