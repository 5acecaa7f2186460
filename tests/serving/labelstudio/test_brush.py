"""The vectorised brush RLE encoder produces exactly the SDK's bytes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import decode_rle, mask2rle

from serving.labelstudio.brush import encode_brush_mask


def _masks():
    rng = np.random.default_rng(7)
    yield np.zeros((48, 64), bool)
    yield np.ones((240, 320), bool)  # runs longer than 2^16 values: split chunks
    blob = np.zeros((120, 160), bool)
    blob[20:90, 30:140] = True
    yield blob
    for shape in [(1, 1), (1, 2), (3, 5), (7, 3), (100, 1), (1, 20000), (37, 53)]:
        for threshold in (0.1, 0.5, 0.9):
            yield rng.random(shape) > threshold
    yy, xx = np.mgrid[:200, :300]
    yield (np.sin(xx / 3.0) * np.cos(yy / 5.0)) > 0.2  # ragged outline


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape}-{int(m.sum())}")
def test_identical_to_the_sdk_encoder(mask):
    ours = encode_brush_mask(mask)
    assert ours.dtype == np.uint8
    assert ours.tolist() == mask2rle(mask.astype(np.uint8) * 255)
    decoded = np.asarray(decode_rle(ours), np.uint8).reshape(*mask.shape, 4)
    np.testing.assert_array_equal(decoded[:, :, 3] == 255, mask)


# Masks as runs: a few runs of any length (up to several 2^16-value chunks) and ragged stretches
# of 1..70 pixel runs (every chunk class), so the SDK's bit-string encoder stays quick.
RUNS = st.lists(st.one_of(st.integers(1, 70), st.integers(1, 40_000)), min_size=1, max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs=RUNS, first=st.booleans(), width=st.integers(1, 700))
def test_identical_to_the_sdk_encoder_on_random_runs(runs, first, width):
    values = np.repeat(np.arange(len(runs)) % 2 == (0 if first else 1), runs)
    values = np.concatenate((values, np.zeros(-values.size % width, bool)))
    mask = values.reshape(-1, width)
    ours = encode_brush_mask(mask)
    assert ours.tolist() == mask2rle(mask.astype(np.uint8) * 255)
    # any non-zero value is foreground, whatever the dtype
    np.testing.assert_array_equal(encode_brush_mask(mask.astype(np.uint8) * 7), ours)


def test_words_crossing_every_word_boundary_position():
    """Runs whose codes (14, 15, 19, 27 bits) end at every bit offset of a 64-bit word."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        runs = rng.choice([1, 2, 3, 4, 5, 64, 65, 300, 16_385, 40_000], size=rng.integers(1, 200))
        values = np.repeat(np.arange(runs.size) % 2 == 0, runs)
        assert encode_brush_mask(values[None]).tolist() == mask2rle(
            values[None].astype(np.uint8) * 255
        )
