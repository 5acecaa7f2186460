"""Pure helpers of efficientsam.utils."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from efficientsam.utils import bicubic_resize_matrix


@pytest.mark.parametrize(
    ("height", "width"), [(480, 640), (640, 480), (1080, 1921), (37, 100), (256, 256), (255, 257)]
)
def test_bicubic_resize_matrix_equals_torch_bicubic(height, width):
    generator = torch.Generator().manual_seed(height * width)
    logits = torch.randn(2, 3, 256, 256, generator=generator) * 8
    expected = F.interpolate(
        logits.flatten(0, 1)[:, None], size=(height, width), mode="bicubic", align_corners=False
    ).reshape(2, 3, height, width)
    rows, columns = bicubic_resize_matrix(256, height), bicubic_resize_matrix(256, width)
    resized = rows @ logits @ columns.T
    assert resized.shape == (2, 3, height, width)
    # PyTorch's float32 kernel is itself ~6e-4 away from a float64 resize at this magnitude.
    assert torch.allclose(resized, expected, atol=1e-3, rtol=0)
    flipped = ((resized >= 0) != (expected >= 0)).float().mean().item()
    assert flipped < 1e-5


def test_bicubic_resize_matrix_rows_sum_to_one_and_identity_at_same_size():
    matrix = bicubic_resize_matrix(256, 700)
    assert torch.allclose(matrix.sum(dim=1), torch.ones(700), atol=1e-6)
    assert torch.equal(bicubic_resize_matrix(64, 64), torch.eye(64))
