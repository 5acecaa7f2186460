"""The EfficientSAM network, one module per part."""

from .efficient_sam import EfficientSam
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .prompt_encoder import PromptEncoder
from .two_way_transformer import TwoWayTransformer

__all__ = ["EfficientSam", "ImageEncoderViT", "MaskDecoder", "PromptEncoder", "TwoWayTransformer"]
