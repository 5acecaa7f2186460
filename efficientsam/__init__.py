"""EfficientSAM (Ti / S) in PyTorch: model, checkpoint loading, predictor and embedding cache."""

from .build import (
    VARIANTS,
    CheckpointError,
    build_efficient_sam,
    build_efficient_sam_s,
    build_efficient_sam_ti,
    load_model,
    save_checkpoint,
)
from .modeling import EfficientSam

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
