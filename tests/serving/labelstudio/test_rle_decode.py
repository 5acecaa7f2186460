"""The bounded brush RLE decoder: the SDK's values on valid streams, refusals before allocating.

Property tests (hypothesis) compare ``serving.labelstudio.brush.decode_rle`` with
``label_studio_sdk.converter.brush.decode_rle`` on random masks (both encoders), on random
well-formed streams of any word size and run-length widths, and on arbitrary bytes (ours either
refuses with BrushRLEError or gives the SDK's values). tracemalloc counts numpy's allocations,
so the bombs check that nothing near the claimed size is ever allocated.
"""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle as sdk_decode_rle
from label_studio_sdk.converter.brush import mask2rle

from serving.labelstudio.brush import BrushRLEError, decode_alpha, decode_rle, encode_brush_mask
from serving.labelstudio.context import PromptError, parse_context

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _bits(value: int, width: int) -> str:
    return format(value, f"0{width}b")


def _stream(bits: str) -> list[int]:
    bits += "0" * (8 - len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def rle_bomb(claimed_values: int, runs: int) -> list[int]:
    """A well-formed stream of ``runs`` repeat runs of 2^16 values (255) under a header that
    claims ``claimed_values`` values: ~3.4 bytes a run."""
    header = _bits(claimed_values, 32) + _bits(7, 5) + "0010001101111111"
    run = "1" + "11" + _bits(2**16 - 1, 16) + _bits(255, 8)
    return _stream(header + run * runs)


@st.composite
def well_formed(draw) -> list[int]:
    """A random complete stream: header, then repeat/literal runs covering the count (the last
    repeat run may overshoot it, which the SDK clips)."""
    count = draw(st.integers(0, 600))
    word = draw(st.integers(1, 8))
    widths = draw(st.lists(st.integers(1, 16), min_size=4, max_size=4))
    bits = _bits(count, 32) + _bits(word - 1, 5) + "".join(_bits(w - 1, 4) for w in widths)
    top = min(255, 2**word - 1)
    index = 0
    while index < count:
        repeat = draw(st.booleans())
        kind = draw(st.integers(0, 3))
        limit = 2 ** widths[kind]
        length = draw(st.integers(1, limit if repeat else min(limit, count - index)))
        bits += ("1" if repeat else "0") + _bits(kind, 2) + _bits(length - 1, widths[kind])
        values = 1 if repeat else length
        bits += "".join(_bits(draw(st.integers(0, top)), word) for _ in range(values))
        index += length
    return _stream(bits)


@FAST
@given(
    st.integers(1, 24),
    st.integers(1, 24),
    st.floats(0, 1),
    st.integers(0, 2**32 - 1),
)
def test_random_masks_decode_like_the_sdk(height, width, density, seed):
    mask = np.random.default_rng(seed).random((height, width)) < density
    for rle in (mask2rle(mask.astype(np.uint8) * 255), encode_brush_mask(mask).tolist()):
        ours = decode_rle(rle, width * height * 4)
        assert ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, sdk_decode_rle(rle))
        np.testing.assert_array_equal(decode_alpha(rle, width, height), mask)


@FAST
@given(well_formed())
def test_well_formed_streams_decode_like_the_sdk(rle):
    np.testing.assert_array_equal(decode_rle(rle, 10**6), sdk_decode_rle(rle))


@FAST
@given(st.integers(0, 300), st.binary(min_size=3, max_size=300))
def test_arbitrary_bytes_are_refused_or_decoded_like_the_sdk(count, tail):
    rle = list(count.to_bytes(4, "big") + tail)
    try:
        ours = decode_rle(rle, 10**6)
    except BrushRLEError:
        return  # refused: truncated, a literal past the end, a value over 255 ...
    np.testing.assert_array_equal(ours, sdk_decode_rle(rle))


@FAST
@given(st.lists(st.integers(0, 255), max_size=64), st.integers(1, 64), st.integers(1, 64))
def test_alpha_decoder_never_allocates_more_than_the_image(rle, width, height):
    tracemalloc.start()
    try:
        decode_alpha(rle, width, height)
    except BrushRLEError:
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 * 1024 + width * height * 2


def test_rle_bomb_is_refused_before_decoding():
    """The issue's bomb: ~220 KB of RLE claiming 1 GiB of values for a 1-pixel-wide image."""
    bomb = rle_bomb(2**30, 2**16)  # runs for 4 GiB; the SDK stops at the claimed 1 GiB
    assert 200_000 < len(bomb) < 240_000
    item = {
        "type": "brushlabels",
        "original_width": 1,
        "original_height": 1,
        "value": {"rle": bomb, "brushlabels": ["Object"]},
    }
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(PromptError, match=r"claims 1073741824 values, expected 1x1x4"):
        parse_context([item])
    seconds = time.perf_counter() - started
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 2 * 1024**2 and seconds < 1.0


def test_literal_past_the_end_truncation_and_wide_values_are_refused():
    header = _bits(8, 32) + _bits(7, 5) + "0010001101111111"
    with pytest.raises(BrushRLEError, match="more values"):  # a 9-value literal in 8
        decode_rle(_stream(header + "0" + "01" + _bits(8, 4) + "0" * 72), 100)
    with pytest.raises(BrushRLEError, match="middle of a run"):
        decode_rle(_stream(header + "1" + "01" + _bits(7, 4)), 100)
    wide = _bits(4, 32) + _bits(15, 5) + "0010001101111111" + "1" + "00" + "011" + _bits(300, 16)
    with pytest.raises(BrushRLEError, match="does not fit in a byte"):
        decode_rle(_stream(wide), 100)
    with pytest.raises(BrushRLEError, match="0..255"):
        decode_rle([0, 0, 0, 4, 256, 0, 0, 0], 100)
    with pytest.raises(BrushRLEError, match="shorter than its header"):
        decode_rle([0, 0, 0], 100)


def test_strokes_are_or_ed_into_one_mask():
    first, second = np.zeros((30, 40), bool), np.zeros((30, 40), bool)
    first[2:10, 3:20], second[5:25, 15:35] = True, True
    union = decode_alpha(mask2rle(first.astype(np.uint8) * 255), 40, 30)
    decode_alpha(encode_brush_mask(second), 40, 30, out=union)
    np.testing.assert_array_equal(union, first | second)


def test_a_stroke_over_the_whole_largest_image_stays_bounded():
    """8000 x 8000 (MAX_IMAGE_PIXELS) filled by a 70 KB stroke: one byte a pixel for the
    mask, the box and points from a pooled copy."""
    width = height = 8000
    mask_rle = rle_bomb(width * height * 4, -(-width * height * 4 // 2**16))
    item = {
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "value": {"rle": mask_rle, "brushlabels": ["Object"]},
    }
    tracemalloc.start()
    prompt = parse_context([item])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert prompt.prompt.box == (0.0, 0.0, 8000.0, 8000.0)
    assert peak < 1.5 * width * height  # the SDK's decode alone: 4 bytes a pixel, then a copy
