"""Fine-tune sync decodes LS annotations with bounds: bombs skip their task, never allocate."""

from __future__ import annotations

import base64
import time
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.labelstudio.annotations import AnnotationError, region_mask, sync_annotations
from serving.labelstudio.label_config import parse_label_config
from tests.http_fixtures import BRUSH_CONFIG, bomb_png
from tests.serving.labelstudio.test_context_properties import JSON
from tests.serving.labelstudio.test_rle_decode import rle_bomb

CONFIG = parse_label_config(BRUSH_CONFIG)


def region(kind: str, value: dict, width: int = 100, height: int = 100) -> dict:
    return {
        "type": kind,
        "original_width": width,
        "original_height": height,
        "to_name": "image",
        "value": value,
    }


def _refused(item: dict, message: str) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(AnnotationError, match=message):
        region_mask(item)
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seconds < 2.0 and peak < 4 * 1024**2, (seconds, peak)


def test_brush_rle_bomb_is_refused_before_decoding():
    bomb = rle_bomb(2**30, 2**16)  # ~220 KB claiming 1 GiB values for a 1 x 1 region
    _refused(region("brushlabels", {"rle": bomb}, 1, 1), "claims 1073741824 values")


def test_bitmask_png_larger_than_its_region_is_refused_before_decoding():
    """12000 x 12000 deflates to 18 KB and is under PIL's own bomb limit (it only warns) and
    under MAX_MASK_PIXELS: decoding it took 144 MB for a 100 x 100 region."""
    png = base64.b64encode(bomb_png(12_000, 12_000)).decode()
    url = "data:image/png;base64," + png
    with pytest.warns(Warning):  # PIL's DecompressionBombWarning when it reads the header
        _refused(region("bitmasklabels", {"imageDataURL": url}), "too large for a 100x100")


def test_bitmask_claiming_100k_squared_is_refused():
    png = base64.b64encode(bomb_png(100_000, 100_000, complete=False)).decode()
    url = "data:image/png;base64," + png
    _refused(region("bitmasklabels", {"imageDataURL": url}), "cannot be decoded|too large")


@pytest.mark.parametrize(
    ("points", "message"),
    [
        ([[0, 0], [1e300, 0], [0, 1e300]], "beyond"),
        ([[0, 0], [float("nan"), 0], [0, 5]], "finite"),
        ([[0, 0], [5, 5]], "3 or more"),
        ("not a list", "3 or more"),
    ],
)
def test_polygon_points_out_of_range_are_refused(points, message):
    _refused(region("polygonlabels", {"points": points}), message)


REGION = st.fixed_dictionaries(
    {"type": st.sampled_from(["brushlabels", "bitmasklabels", "polygonlabels", "choices"])},
    optional={
        "original_width": st.integers(-2, 30) | JSON,
        "original_height": st.integers(-2, 30) | JSON,
        "value": st.fixed_dictionaries(
            {},
            optional={
                "rle": st.lists(st.integers(0, 255), max_size=40) | JSON,
                "imageDataURL": st.sampled_from(["data:image/png;base64,", "x,@@", "none"]) | JSON,
                "points": st.lists(st.lists(st.floats() | JSON, max_size=3), max_size=5) | JSON,
            },
        )
        | JSON,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(REGION | JSON)
def test_any_region_gives_a_mask_none_or_annotation_error(item):
    if not isinstance(item, dict):
        return
    try:
        mask = region_mask(item)
    except AnnotationError:
        return
    assert mask is None or (mask.dtype == bool and mask.ndim == 2)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.fixed_dictionaries({"id": st.integers(1, 9)}, optional={"data": JSON, "annotations": JSON})
)
def test_any_task_is_kept_skipped_or_ignored(task):
    kept, skipped = sync_annotations([task], CONFIG)
    assert len(kept) + len(skipped) <= 1
