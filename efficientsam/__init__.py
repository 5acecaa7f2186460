"""EfficientSAM (Ti / S) in PyTorch: model, checkpoint loading, predictor and embedding cache.

The top-level names are imported on first use, so that torch-free parts of the library
(``efficientsam.prompts``, ``efficientsam.arrays``) can be used by processes without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "VARIANTS": "build",
    "CheckpointError": "checkpoint",
    "build_efficient_sam": "build",
    "build_efficient_sam_s": "build",
    "build_efficient_sam_ti": "build",
    "load_model": "build",
    "save_checkpoint": "checkpoint",
    "EfficientSam": "modeling",
}

__all__ = [
    "VARIANTS",
    "CheckpointError",
    "EfficientSam",
    "build_efficient_sam",
    "build_efficient_sam_s",
    "build_efficient_sam_ti",
    "load_model",
    "save_checkpoint",
]

if TYPE_CHECKING:
    from .build import (
        VARIANTS,
        build_efficient_sam,
        build_efficient_sam_s,
        build_efficient_sam_ti,
        load_model,
    )
    from .checkpoint import CheckpointError, save_checkpoint
    from .modeling import EfficientSam


def __getattr__(name: str) -> object:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'efficientsam' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)
