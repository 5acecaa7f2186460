"""Label Studio ``params.context.result`` -> one EfficientSAM prompt (:func:`parse_context`;
the rules are documented in README too). Bounded: a request that is too large or malformed is
refused with a message, never allocated for.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from efficientsam.prompts import Prompt
from serving.labelstudio.brush import BrushRLEError, decode_alpha

MAX_STROKE_POINTS = 4
MIN_BOX_SIDE = 8  # pixels
MAX_IMAGE_PIXELS = 64_000_000  # Settings.max_image_pixels' default
PERCENT_TOLERANCE = 1.0  # coordinates within [-1, 101] % are clamped, beyond is an error
MAX_CONTEXT_ITEMS = 500  # items in context.result (clicks, boxes, strokes); the model uses <= 6
STROKE_WORK_PIXELS = 512 * 512  # a stroke's box above this is max-pooled to about this size


PROMPT_TYPES = ("keypointlabels", "rectanglelabels", "brushlabels")


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


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        # the type only: a value's repr can be megabytes, or too deep to print
        raise PromptError(f"{what} must be a finite number, got {_json_type(value)}")
    if abs(value) > 1e300:  # also an int beyond any float (checked before converting)
        raise PromptError(f"{what} must be a finite number, got one beyond 1e300")
    if not math.isfinite(value):
        raise PromptError(f"{what} must be a finite number, got {value}")
    return float(value)


def _json_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", str: "a string", list: "a list"}
    return names.get(type(value), "an object" if isinstance(value, dict) else type(value).__name__)


def _percent(value: object, what: str) -> float:
    number = _number(value, what)
    if not -PERCENT_TOLERANCE <= number <= 100 + PERCENT_TOLERANCE:
        raise PromptError(f"{what} = {number} is outside the image (0..100 %)")
    return min(max(number, 0.0), 100.0)


def _is_positive(item: dict) -> bool:
    if isinstance(item.get("is_positive"), bool):
        return item["is_positive"]
    value = item.get("value")
    positive = value.get("positive") if isinstance(value, dict) else None
    return positive if isinstance(positive, bool) else True


def _label(item: dict) -> str | None:
    value = item.get("value")
    if not isinstance(value, dict):
        return None
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
    if max(box_width, box_height) > 2 * math.hypot(width, height):
        raise PromptError("rectangle is larger than the image (width or height in percent)")
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


def decode_brush_mask(
    value: dict, width: int, height: int, out: np.ndarray | None = None
) -> np.ndarray:
    """A brush item's RLE -> (height, width) bool mask (alpha > 0), OR-ed into ``out`` when
    given. The RLE's claimed size is checked against ``width x height x 4`` before decoding."""
    rle = value.get("rle")
    if not isinstance(rle, list) or not rle:
        raise PromptError("brush stroke has no 'rle' list")
    try:
        return decode_alpha(rle, width, height, out)
    except BrushRLEError as error:
        raise PromptError(str(error)) from None


def stroke_prompt(mask: np.ndarray) -> tuple[tuple[float, float, float, float] | None, np.ndarray]:
    """The box around a stroke mask (None when it is under ``MIN_BOX_SIDE`` pixels in either
    direction: points only) and up to 4 points (x, y) inside it, by farthest-point sampling from
    the stroke's most interior pixel (a long stroke is covered end to end). A stroke's box over
    ``STROKE_WORK_PIXELS`` is max-pooled to about that size before the distance transform."""
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise PromptError("brush stroke is empty")
    x0, x1, y0, y1 = int(columns[0]), int(columns[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    box = None
    if x1 - x0 >= MIN_BOX_SIDE and y1 - y0 >= MIN_BOX_SIDE:
        box = (float(x0), float(y0), float(x1), float(y1))
    crop = mask[y0:y1, x0:x1]
    factor = math.ceil(math.sqrt(crop.size / STROKE_WORK_PIXELS))
    if factor > 1:  # pool, choose cells, then a stroke pixel in each chosen cell
        cells = _pool(crop, factor)
        return box, np.array(
            [_pixel_in_cell(crop, factor, x, y) for x, y in _stroke_points(cells)], np.float32
        ) + np.array([x0, y0], np.float32)
    return box, _stroke_points(crop) + np.array([x0 + 0.5, y0 + 0.5], np.float32)  # centres


def _pool(mask: np.ndarray, factor: int) -> np.ndarray:
    """``factor`` x ``factor`` max-pooling of a bool mask (no padded copy)."""
    rows = np.logical_or.reduceat(mask, np.arange(0, mask.shape[0], factor), axis=0)
    return np.logical_or.reduceat(rows, np.arange(0, mask.shape[1], factor), axis=1)


def _pixel_in_cell(mask: np.ndarray, factor: int, x: int, y: int) -> tuple[float, float]:
    """The centre of the stroke pixel nearest the centre of pooled cell (x, y)."""
    x, y = int(x), int(y)
    cell = mask[y * factor : (y + 1) * factor, x * factor : (x + 1) * factor]
    ys, xs = np.nonzero(cell)
    nearest = int(np.argmin(np.hypot(xs + 0.5 - factor / 2, ys + 0.5 - factor / 2)))
    return x * factor + xs[nearest] + 0.5, y * factor + ys[nearest] + 0.5


def _stroke_points(crop: np.ndarray) -> np.ndarray:
    """Up to 4 (x, y) pixel indices of a non-empty mask: its most interior pixel, then
    farthest-point sampling."""
    import cv2

    crop = np.pad(crop.astype(np.uint8), 1)
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
    return coordinates[chosen]


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
    """``context.result`` -> one prompt, or None when there are no prompt items.

    * Keypoints: (x, y) percent of ``original_width``/``original_height`` -> pixels; negative
      when the top-level ``is_positive`` is false (LS's editor, Alt-click) or, when that is
      absent, ``value.positive`` is false (newer front-ends); absent = positive. Clicks keep
      their order.
    * Rectangles: the box around the (possibly rotated) rectangle, clipped to the image. One box
      per prompt: the most recent rectangle is used, older ones are counted as dropped.
    * Brush strokes (``brushlabels`` RLE): their union becomes a box and up to 4 positive points
      (:func:`stroke_prompt`); a rectangle's box wins over the strokes' box.
    * All items form one prompt; the predictor keeps the box corners and the most recent
      clicks (at most 6 tokens) and reports what it dropped.

    Bounds (PromptError): at most ``MAX_CONTEXT_ITEMS`` items; an image size of at most
    ``max_pixels``; coordinates finite and within the image (1 % tolerance), rectangle sides at
    most twice the image's diagonal; a brush RLE's header must claim exactly
    ``original_width x original_height x 4`` values, checked before decoding (only the alpha
    channel is decoded, into one mask for all strokes)."""
    if not isinstance(result, (list, tuple)):
        raise PromptError("context.result must be a list")
    if len(result) > MAX_CONTEXT_ITEMS:
        raise PromptError(
            f"context.result has {len(result)} items, at most {MAX_CONTEXT_ITEMS} are accepted"
        )
    items = [item for item in result if isinstance(item, dict)]
    if len(items) != len(result):
        raise PromptError("every context.result item must be an object")
    items = [i for i in items if i.get("type") in PROMPT_TYPES]
    if not items:
        return None
    width, height = items[0].get("original_width"), items[0].get("original_height")
    check_image_size(width, height, max_pixels)
    for item in items:
        if (item.get("original_width"), item.get("original_height")) != (width, height):
            raise PromptError("prompt items disagree on original_width/original_height")

    points: list[tuple[float, float]] = []
    labels: list[int] = []
    boxes: list[tuple[float, float, float, float]] = []
    stroke: np.ndarray | None = None  # the union of the brush strokes
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
            stroke = decode_brush_mask(value, width, height, stroke)
    box = boxes[-1] if boxes else None
    if stroke is not None:
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
