"""The vectorised brush RLE encoder produces exactly the SDK's bytes."""

from __future__ import annotations

import numpy as np
import pytest
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
