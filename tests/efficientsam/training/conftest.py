"""Small training inputs: masks on random embeddings (fast) and synthetic images (real ones)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from efficientsam.training import TrainingImage


def disc(height: int, width: int, cx: float, cy: float, radius: float) -> np.ndarray:
    ys, xs = np.mgrid[0:height, 0:width]
    return (xs + 0.5 - cx) ** 2 + (ys + 0.5 - cy) ** 2 <= radius**2


@pytest.fixture
def random_images() -> list[TrainingImage]:
    """Two images with random embeddings: one with two discs, one with a rectangle."""
    generator = torch.Generator().manual_seed(0)
    rectangle = np.zeros((120, 90), bool)
    rectangle[20:70, 10:60] = True
    return [
        TrainingImage(
            "first",
            torch.randn(1, 256, 64, 64, generator=generator),
            [disc(100, 140, 40, 50, 20), disc(100, 140, 100, 40, 15)],
        ),
        TrainingImage("second", torch.randn(1, 256, 64, 64, generator=generator), [rectangle]),
    ]
