"""Masks -> LS result items."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from serving.labelstudio.label_config import OutputControl
from serving.labelstudio.results import mask_results
from tests.http_fixtures import decode_brush


def _mask() -> np.ndarray:
    mask = np.zeros((48, 64), bool)
    mask[10:30, 5:25] = True
    mask[35:45, 40:60] = True
    return mask


def test_brush_rle_round_trips_with_alpha_255():
    output = OutputControl("BrushLabels", "tag", "image", ("Object", "Car"))
    (item,) = mask_results(_mask(), output, "Car", 0.91234567)
    assert (
        item["type"] == "brushlabels" and item["from_name"] == "tag" and item["to_name"] == "image"
    )
    assert (item["original_width"], item["original_height"]) == (64, 48)
    assert item["value"]["brushlabels"] == ["Car"] and item["score"] == 0.912346
    np.testing.assert_array_equal(decode_brush(item), _mask())


def test_bitmask_png_data_url():
    output = OutputControl("BitmaskLabels", "bm", "image", ("Object",))
    (item,) = mask_results(_mask(), output, "Object", 0.5)
    header, payload = item["value"]["imageDataURL"].split(",", 1)
    assert header == "data:image/png;base64" and item["value"]["bitmasklabels"] == ["Object"]
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(payload)))) > 0
    np.testing.assert_array_equal(decoded, _mask())


def test_polygons_in_percent_one_per_region():
    output = OutputControl("PolygonLabels", "poly", "image", ("Object",))
    items = mask_results(_mask(), output, "Object", 0.5)
    assert len(items) == 2
    for item in items:
        points = np.array(item["value"]["points"])
        assert item["type"] == "polygonlabels" and item["value"]["closed"]
        assert (points >= 0).all() and (points <= 100).all() and len(points) >= 4
    boxes = sorted(
        (p[:, 0].min(), p[:, 1].min()) for p in (np.array(i["value"]["points"]) for i in items)
    )
    assert boxes[0] == pytest.approx((5 * 100 / 64, 10 * 100 / 48), abs=1e-4)
