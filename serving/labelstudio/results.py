"""Masks -> Label Studio result items: BrushLabels RLE, BitmaskLabels PNG, PolygonLabels."""

from __future__ import annotations

import base64
import io
import secrets

import numpy as np

from serving.labelstudio.brush import encode_brush_mask
from serving.labelstudio.label_config import OutputControl

MIN_POLYGON_AREA = 16  # pixels; smaller fragments are dropped from polygon output


def region_id() -> str:
    return secrets.token_urlsafe(8)[:10]


def brush_rle(mask: np.ndarray) -> np.ndarray:
    """LS brush RLE of a (H, W) bool mask: RGBA with alpha 255 on the mask (the SDK's format,
    vectorised: see serving/labelstudio/brush.py), as a uint8 array (JSON-encode with orjson's numpy option,
    or ``.tolist()``)."""
    return encode_brush_mask(mask)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a (H, W) bool mask to size = (width, height) pixels (the
    browser's image size, when the downloaded file has another size)."""
    if (mask.shape[1], mask.shape[0]) == tuple(size):
        return mask
    from PIL import Image

    resized = Image.fromarray(mask.astype(np.uint8) * 255).resize(tuple(size), Image.NEAREST)
    return np.asarray(resized) > 127


def png_data_url(mask: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def mask_polygons(mask: np.ndarray, width: int, height: int) -> list[list[list[float]]]:
    """Outer contours of a mask as polygons in percent of (width, height)."""
    import cv2

    contours, _ = cv2.findContours(
        mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE
    )
    polygons = []
    for contour in contours:
        if cv2.contourArea(contour) < MIN_POLYGON_AREA:
            continue
        contour = cv2.approxPolyDP(contour, epsilon=1.0, closed=True)
        if len(contour) < 3:
            continue
        points = contour.reshape(-1, 2).astype(np.float64)
        polygons.append(
            [[round(x * 100 / width, 4), round(y * 100 / height, 4)] for x, y in points]
        )
    return polygons


def mask_results(mask: np.ndarray, output: OutputControl, label: str, score: float) -> list[dict]:
    """Result items for one (H, W) bool mask at the image's original (browser) size."""
    height, width = mask.shape
    base = {
        "from_name": output.name,
        "to_name": output.to_name,
        "type": output.result_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "score": round(float(score), 6),
        "readonly": False,
    }
    if output.tag == "BrushLabels":
        value = {"format": "rle", "rle": brush_rle(mask), "brushlabels": [label]}
        return [{"id": region_id(), **base, "value": value}]
    if output.tag == "BitmaskLabels":
        value = {"imageDataURL": png_data_url(mask), "bitmasklabels": [label]}
        return [{"id": region_id(), **base, "value": value}]
    return [
        {
            "id": region_id(),
            **base,
            "value": {"points": polygon, "closed": True, "polygonlabels": [label]},
        }
        for polygon in mask_polygons(mask, width, height)
    ]
