"""Variant table, builders per variant, and ``load_model`` (a checkpoint file -> the model of its
variant, loaded strictly; the file formats are :mod:`efficientsam.checkpoint`'s).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_state_dict_file, load_state_dict_strict
from .modeling import (
    EfficientSam,
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    TwoWayTransformer,
)
from .utils import resolve_device

logger = logging.getLogger(__name__)

PATCH_EMBED_KEY = "image_encoder.patch_embed.proj.weight"


@dataclass(frozen=True)
class Variant:
    """Encoder width and heads of one EfficientSAM variant."""

    name: str
    embed_dim: int
    num_heads: int
    depth: int = 12


VARIANTS: dict[str, Variant] = {
    "ti": Variant("ti", embed_dim=192, num_heads=3),
    "s": Variant("s", embed_dim=384, num_heads=6),
}


def build_efficient_sam(variant: str | Variant) -> EfficientSam:
    """An EfficientSAM of the given variant ("ti" or "s"), randomly initialised, float32, CPU."""
    if isinstance(variant, str):
        if variant.lower() not in VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; expected one of {sorted(VARIANTS)}")
        variant = VARIANTS[variant.lower()]
    image_encoder = ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        patch_embed_dim=variant.embed_dim,
        depth=variant.depth,
        num_heads=variant.num_heads,
        mlp_ratio=4.0,
        neck_dims=(256,),
    )
    image_embedding_size = image_encoder.image_embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=256,
        image_embedding_size=(image_embedding_size, image_embedding_size),
        input_image_size=(1024, 1024),
    )
    transformer = TwoWayTransformer(
        depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048, attention_downsample_rate=2
    )
    mask_decoder = MaskDecoder(
        transformer_dim=256,
        transformer=transformer,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        upscaling_layer_dims=(64, 32),
    )
    model = EfficientSam(image_encoder, prompt_encoder, mask_decoder)
    model.variant = variant.name
    return model


def build_efficient_sam_ti() -> EfficientSam:
    """EfficientSAM-Ti: ViT width 192, 3 heads (10,223,204 parameters)."""
    return build_efficient_sam("ti")


def build_efficient_sam_s() -> EfficientSam:
    """EfficientSAM-S: ViT width 384, 6 heads (26,413,028 parameters)."""
    return build_efficient_sam("s")


def infer_variant(state_dict: Mapping[str, torch.Tensor]) -> Variant:
    """The variant whose encoder width matches ``image_encoder.patch_embed.proj.weight``."""
    weight = state_dict.get(PATCH_EMBED_KEY)
    if weight is None:
        raise CheckpointError(
            f"not an EfficientSAM checkpoint: no {PATCH_EMBED_KEY!r} among its "
            f"{len(state_dict)} tensors"
        )
    for variant in VARIANTS.values():
        if weight.shape[0] == variant.embed_dim:
            return variant
    widths = {name: v.embed_dim for name, v in VARIANTS.items()}
    raise CheckpointError(
        f"unknown EfficientSAM variant: encoder width {weight.shape[0]} (known widths: {widths})"
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> EfficientSam:
    """Build the variant a checkpoint was made for and load it strictly.

    Returns the model in eval mode, float32, on ``device`` ("cpu", "cuda", "cuda:1", or "auto"
    for cuda when available).
    """
    started = time.perf_counter()
    state_dict = load_state_dict_file(path)
    model = model_from_state_dict(state_dict, device, source=path)
    logger.info(
        "loaded EfficientSAM-%s from %s on %s in %.2f s",
        infer_variant(state_dict).name.upper(),
        path,
        model.device,
        time.perf_counter() - started,
    )
    return model


def model_from_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    source: str | Path | None = None,
) -> EfficientSam:
    """The variant ``state_dict`` was made for, loaded strictly: eval mode, float32, on
    ``device``; ``source`` (the file it came from) is recorded as ``checkpoint_path``."""
    model = build_efficient_sam(infer_variant(state_dict))
    load_state_dict_strict(model, {key: value.float() for key, value in state_dict.items()})
    model = model.to(resolve_device(device)).eval()
    if source is not None:
        model.checkpoint_path = str(source)
    return model
