"""Label Studio ``params.context.result`` -> one EfficientSAM prompt.

Rules (documented in README):
* Keypoints: (x, y) percent of ``original_width``/``original_height`` -> pixels; negative when
  the top-level ``is_positive`` is false (LS's editor, Alt-click) or, when that is absent,
  ``value.positive`` is false (newer front-ends); absent = positive. Clicks keep their order.
* Rectangles: the box around the (possibly rotated) rectangle, clipped to the image. EfficientSAM
  takes one box per prompt: the most recent rectangle is used and older ones are reported as
  dropped.
* Brush strokes (``brushlabels`` RLE): the union of the strokes becomes the box around it plus
  up to 4 positive points inside it, chosen by farthest-point sampling that starts at the
  stroke's most interior pixel (so a long stroke is covered end to end). A stroke smaller than
  ``MIN_BOX_SIDE`` pixels in either direction gives points only (its box would be meaningless).
* All items of one request form one prompt; the predictor then keeps the box corners and the
  most recent clicks (at most 6 tokens) and reports what it dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from efficientsam.prompts import Prompt

MAX_STROKE_POINTS = 4
MIN_BOX_SIDE = 8  # pixels
MAX_IMAGE_PIXELS = 64_000_000  # Settings.max_image_pixels' default
PERCENT_TOLERANCE = 1.0  # coordinates within [-1, 101] % are clamped, beyond is an error


class PromptError(ValueError):
    """The context cannot be turned into a prompt (message is shown to the user)."""


@dataclass(frozen=True)
class InteractivePrompt:
    """One prompt in pixels of an image of ``size`` = (width, height) (the browser's size)."""

    prompt: Prompt
    size: tuple[int, int]
    label: str | None
    from_name: str | None
    to_name: str | None
    dropped_items: int  # rectangles that did not fit (one box per prompt)

    def scaled_to(self, width: int, height: int) -> Prompt:
        """The prompt in pixels of a (width, height) image (e.g. the downloaded file)."""
        if (width, height) == self.size:
            return self.prompt
        scale = np.array([width / self.size[0], height / self.size[1]], np.float32)
        box = None
        if self.prompt.box is not None:
            x0, y0, x1, y1 = self.prompt.box
            box = (x0 * scale[0], y0 * scale[1], x1 * scale[0], y1 * scale[1])
        return Prompt(self.prompt.points * scale, self.prompt.labels, box)


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PromptError(f"{what} must be a finite number, got {value!r}")
    return float(value)


def _percent(value: object, what: str) -> float:
    number = _number(value, what)
    if not -PERCENT_TOLERANCE <= number <= 100 + PERCENT_TOLERANCE:
        raise PromptError(f"{what} = {number} is outside the image (0..100 %)")
    return min(max(number, 0.0), 100.0)


def _is_positive(item: dict) -> bool:
    if isinstance(item.get("is_positive"), bool):
        return item["is_positive"]
    positive = (item.get("value") or {}).get("positive")
    return positive if isinstance(positive, bool) else True


def _label(item: dict) -> str | None:
    value = item.get("value") or {}
    for key in (item.get("type"), "labels"):
        labels = value.get(key) if key else None
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def rectangle_box(value: dict, width: int, height: int) -> tuple[float, float, float, float]:
    x = _percent(value.get("x"), "rectangle x") * width / 100
    y = _percent(value.get("y"), "rectangle y") * height / 100
    box_width = _number(value.get("width"), "rectangle width") * width / 100
    box_height = _number(value.get("height"), "rectangle height") * height / 100
    if box_width <= 0 or box_height <= 0:
        raise PromptError("rectangle has zero (or negative) width or height")
    angle = math.radians(_number(value.get("rotation", 0) or 0, "rectangle rotation"))
    cos, sin = math.cos(angle), math.sin(angle)
    corners = [(0, 0), (box_width, 0), (box_width, box_height), (0, box_height)]
    # LS rotates clockwise (y points down) around the top-left corner.
    xs = [x + dx * cos - dy * sin for dx, dy in corners]
    ys = [y + dx * sin + dy * cos for dx, dy in corners]
    x0, x1 = max(0.0, min(xs)), min(float(width), max(xs))
    y0, y1 = max(0.0, min(ys)), min(float(height), max(ys))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        raise PromptError("rectangle lies outside the image")
    return x0, y0, x1, y1


def decode_brush_mask(value: dict, width: int, height: int) -> np.ndarray:
    """A brush item's RLE -> (height, width) bool mask (alpha > 0)."""
    from label_studio_sdk.converter.brush import decode_rle

    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise PromptError("brush stroke has no 'rle' list")
    try:
        flat = np.asarray(decode_rle(rle), dtype=np.uint8)
    except Exception as error:  # malformed bit stream
        raise PromptError(f"cannot decode brush RLE: {error}") from error
    if flat.size != width * height * 4:
        raise PromptError(
            f"brush RLE holds {flat.size} values, expected {width}x{height}x4 = "
            f"{width * height * 4} for the image size given"
        )
    return flat.reshape(height, width, 4)[:, :, 3] > 0


def stroke_prompt(mask: np.ndarray) -> tuple[tuple[float, float, float, float] | None, np.ndarray]:
    """The box around a stroke mask (None if too small) and up to 4 points (x, y) inside it."""
    import cv2

    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise PromptError("brush stroke is empty")
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    box = None
    if x1 - x0 >= MIN_BOX_SIDE and y1 - y0 >= MIN_BOX_SIDE:
        box = (float(x0), float(y0), float(x1), float(y1))
    crop = np.pad(mask[y0:y1, x0:x1].astype(np.uint8), 1)
    depth = cv2.distanceTransform(crop, cv2.DIST_L2, 3)[1:-1, 1:-1]
    inside_y, inside_x = np.nonzero(depth > 0)
    coordinates = np.stack([inside_x, inside_y], axis=1).astype(np.float32)
    first = int(np.argmax(depth[inside_y, inside_x]))
    chosen = [first]
    distance = np.linalg.norm(coordinates - coordinates[first], axis=1)
    while len(chosen) < min(MAX_STROKE_POINTS, len(coordinates)):
        candidate = int(np.argmax(distance))
        if distance[candidate] < 2.0:  # the stroke is covered
            break
        chosen.append(candidate)
        distance = np.minimum(
            distance, np.linalg.norm(coordinates - coordinates[candidate], axis=1)
        )
    points = coordinates[chosen] + np.array([x0 + 0.5, y0 + 0.5], np.float32)  # pixel centres
    return box, points


def check_image_size(width: object, height: object, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """Raise PromptError unless (width, height) are positive integer pixels, at most
    ``max_pixels`` in all (masks are answered at this size: never allocate an absurd one)."""
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (width, height)):
        raise PromptError("prompt items need positive integer original_width/original_height")
    if width * height > max_pixels:
        raise PromptError(
            f"original_width x original_height = {width} x {height} is more than "
            f"{max_pixels} pixels (MAX_IMAGE_PIXELS)"
        )


def parse_context(
    result: Sequence[dict], max_pixels: int = MAX_IMAGE_PIXELS
) -> InteractivePrompt | None:
    """``context.result`` -> one prompt, or None when there are no prompt items. The image size
    the items give is at most ``max_pixels``."""
    if not isinstance(result, (list, tuple)):
        raise PromptError("context.result must be a list")
    items = [item for item in result if isinstance(item, dict)]
    if len(items) != len(result):
        raise PromptError("every context.result item must be an object")
    items = [
        i for i in items if i.get("type") in ("keypointlabels", "rectanglelabels", "brushlabels")
    ]
    if not items:
        return None
    sizes = {(item.get("original_width"), item.get("original_height")) for item in items}
    if len(sizes) != 1:
        raise PromptError("prompt items disagree on original_width/original_height")
    width, height = sizes.pop()
    check_image_size(width, height, max_pixels)

    points: list[tuple[float, float]] = []
    labels: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    stroke = np.zeros((0, 0), bool)
    for item in items:
        value = item.get("value")
        if not isinstance(value, dict):
            raise PromptError("prompt item has no 'value' object")
        kind = item["type"]
        if kind == "keypointlabels":
            x = _percent(value.get("x"), "keypoint x") * width / 100
            y = _percent(value.get("y"), "keypoint y") * height / 100
            points.append((x, y))
            labels.append(1 if _is_positive(item) else 0)
        elif kind == "rectanglelabels":
            boxes.append(rectangle_box(value, width, height))
        else:
            mask = decode_brush_mask(value, width, height)
            stroke = mask if stroke.size == 0 else (stroke | mask)
    box = boxes[-1] if boxes else None
    if stroke.size:
        stroke_box, stroke_points = stroke_prompt(stroke)
        box = box if box is not None else stroke_box
        points.extend(map(tuple, stroke_points.tolist()))
        labels.extend([1] * len(stroke_points))
    last = items[-1]
    prompt = Prompt.create(points or None, labels or None, box)
    return InteractivePrompt(
        prompt=prompt,
        size=(width, height),
        label=_label(last),
        from_name=last.get("from_name"),
        to_name=last.get("to_name"),
        dropped_items=max(0, len(boxes) - 1),
    )
