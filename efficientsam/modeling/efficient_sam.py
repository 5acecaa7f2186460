"""The EfficientSAM model: preprocessing, image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import DecodedTokens, MaskDecoder
from .prompt_encoder import LABEL_PADDING, PromptEncoder
from .two_way_transformer import PreparedImage

PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


class EfficientSam(nn.Module):
    """EfficientSAM with the reference's batched API.

    Images are (B, 3, H, W) float RGB in [0, 1] at any size; they are stretched (no padding, no
    antialias) to 1024x1024. Prompts are points (B, Q, N, 2) as (x, y) pixels of the original
    image and labels (B, Q, N): 1 positive, 0 negative, 2 box top-left, 3 box bottom-right,
    -1 padding. Exactly 6 prompt tokens reach the decoder (padded with (-1, -1)/-1 or truncated
    to the first 6).
    """

    mask_threshold: float = 0.0
    image_format: str = "RGB"
    decoder_max_num_input_points: int = 6

    def __init__(
        self,
        image_encoder: ImageEncoderViT,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        pixel_mean: tuple[float, float, float] = PIXEL_MEAN,
        pixel_std: tuple[float, float, float] = PIXEL_STD,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(1, 3, 1, 1), False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def input_size(self) -> int:
        return self.image_encoder.img_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, 1024, 1024) stretched (bilinear) and normalised."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        size = self.input_size
        if images.shape[2] != size or images.shape[3] != size:
            images = F.interpolate(
                images, size=(size, size), mode="bilinear", align_corners=False, antialias=False
            )
        return (images - self.pixel_mean) / self.pixel_std

    def get_image_embeddings(
        self, images: torch.Tensor, blocks_dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> image embeddings (B, 256, 64, 64) float32;
        ``blocks_dtype``: the encoder's fast mode (see :meth:`ImageEncoderViT.forward`)."""
        return self.image_encoder(self.preprocess(images), blocks_dtype)

    def rescale_points(self, points: torch.Tensor, input_h: int, input_w: int) -> torch.Tensor:
        """(x, y) pixels of an input_w x input_h image -> pixels of the 1024 frame; any negative
        coordinate becomes exactly -1."""
        size = self.input_size
        x = points[..., 0]
        y = points[..., 1]
        return torch.stack(
            [
                torch.where(x >= 0, x * size / input_w, -1.0),
                torch.where(y >= 0, y * size / input_h, -1.0),
            ],
            dim=-1,
        )

    def fit_to_prompt_tokens(
        self, points: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pad (with (-1, -1) / -1) or truncate (keep the first) the point axis to 6 tokens."""
        max_points = self.decoder_max_num_input_points
        num_points = points.shape[2]
        if num_points > max_points:
            return points[:, :, :max_points], labels[:, :, :max_points]
        if num_points < max_points:
            missing = max_points - num_points
            batch, num_queries = points.shape[:2]
            points = torch.cat(
                [points, points.new_full((batch, num_queries, missing, 2), -1.0)], dim=2
            )
            labels = torch.cat(
                [labels, labels.new_full((batch, num_queries, missing), LABEL_PADDING)], dim=2
            )
        return points, labels

    def prepare_image_embeddings(self, image_embeddings: torch.Tensor) -> PreparedImage:
        """Precompute the decoder's per-image work for (B, 256, 64, 64) embeddings; the result
        can be passed to :meth:`predict_masks` instead of the embeddings, for many prompts."""
        image_pe = self.prompt_encoder.get_dense_pe().to(image_embeddings.dtype)
        return self.mask_decoder.transformer.prepare_image(image_embeddings, image_pe)

    def _prompt_embeddings(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        batched_points: torch.Tensor,
        batched_point_labels: torch.Tensor,
        input_h: int,
        input_w: int,
    ) -> tuple[torch.Tensor, torch.dtype]:
        """Checked prompts (B, Q, N, 2) pixels, labels (B, Q, N) -> sparse prompt embeddings
        (B, Q, 6, 256) in the image embeddings' dtype, and that dtype."""
        if batched_points.dim() != 4 or batched_points.shape[-1] != 2:
            raise ValueError(f"points must be (B, Q, N, 2), got {tuple(batched_points.shape)}")
        if batched_point_labels.shape != batched_points.shape[:-1]:
            raise ValueError(
                f"labels must be (B, Q, N) = {tuple(batched_points.shape[:-1])}, "
                f"got {tuple(batched_point_labels.shape)}"
            )
        reference = (
            image_embeddings.keys
            if isinstance(image_embeddings, PreparedImage)
            else image_embeddings
        )
        if batched_points.shape[0] != reference.shape[0]:
            raise ValueError(
                f"{reference.shape[0]} image embeddings but points for "
                f"{batched_points.shape[0]} images"
            )
        dtype = reference.dtype
        points = batched_points.to(device=reference.device, dtype=torch.float32)
        labels = batched_point_labels.to(device=reference.device, dtype=torch.int64)
        points, labels = self.fit_to_prompt_tokens(points, labels)
        points = self.rescale_points(points, input_h, input_w)
        sparse_embeddings = self.prompt_encoder(points, labels).to(dtype)
        return sparse_embeddings, dtype

    def decode_tokens(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        batched_points: torch.Tensor,
        batched_point_labels: torch.Tensor,
        multimask_output: bool,
        input_h: int,
        input_w: int,
    ) -> DecodedTokens:
        """:meth:`predict_masks` up to, not including, the mask upscaling (same inputs): the
        IoU predictions (B, Q, K) and what
        :meth:`MaskDecoder.upscale_and_predict_masks` needs for the (256, 256) logits of any
        chosen queries and candidates (see :class:`DecodedTokens`)."""
        sparse_embeddings, dtype = self._prompt_embeddings(
            image_embeddings, batched_points, batched_point_labels, input_h, input_w
        )
        return self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_embeddings,
            multimask_output,
            upscale=False,
        )

    def predict_masks(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        batched_points: torch.Tensor,
        batched_point_labels: torch.Tensor,
        multimask_output: bool,
        input_h: int,
        input_w: int,
        output_h: int = -1,
        output_w: int = -1,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder-only prediction from cached embeddings.

        image_embeddings (B, 256, 64, 64) or from :meth:`prepare_image_embeddings`; points
        (B, Q, N, 2) (x, y) pixels of the original input_w x input_h image; labels (B, Q, N).
        Returns logits (B, Q, K, h, w) with (h, w) = (output_h, output_w) when both are > 0
        (bicubic upscale) else (256, 256), and raw IoU predictions (B, Q, K); K = 3 with
        ``multimask_output`` else 1.
        """
        sparse_embeddings, dtype = self._prompt_embeddings(
            image_embeddings, batched_points, batched_point_labels, input_h, input_w
        )
        low_res_logits, iou_predictions = self.mask_decoder(
            image_embeddings,
            self.prompt_encoder.get_dense_pe().to(dtype),
            sparse_embeddings,
            multimask_output,
        )
        if output_h > 0 and output_w > 0:
            batch, num_queries, num_masks = low_res_logits.shape[:3]
            upscaled = F.interpolate(
                low_res_logits.flatten(0, 1),
                size=(output_h, output_w),
                mode="bicubic",
                align_corners=False,
            )
            low_res_logits = upscaled.reshape(batch, num_queries, num_masks, output_h, output_w)
        return low_res_logits, iou_predictions

    def forward(
        self,
        batched_images: torch.Tensor,
        batched_points: torch.Tensor,
        batched_point_labels: torch.Tensor,
        scale_to_original_image_size: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """End-to-end, always multimask: logits (B, Q, 3, H, W) (or 256x256), IoU (B, Q, 3)."""
        _, _, height, width = batched_images.shape
        image_embeddings = self.get_image_embeddings(batched_images)
        output_h, output_w = (height, width) if scale_to_original_image_size else (-1, -1)
        return self.predict_masks(
            image_embeddings,
            batched_points,
            batched_point_labels,
            True,
            height,
            width,
            output_h,
            output_w,
        )
