"""Mask decoder: two-way transformer, transposed-conv upscaling and hypernetwork heads."""

from __future__ import annotations

import torch
from torch import nn

from .common import MLP
from .two_way_transformer import TwoWayTransformer


class MaskDecoder(nn.Module):
    """Image embeddings + sparse prompt embeddings -> low-res mask logits and predicted IoU.

    Tokens per query are [IoU token, 4 mask tokens, prompt tokens]. Mask token 0 is the
    single-mask output, tokens 1..3 the multimask candidates. IoU scores are raw (no sigmoid).
    """

    def __init__(
        self,
        transformer_dim: int,
        transformer: TwoWayTransformer,
        num_multimask_outputs: int = 3,
        activation: type[nn.Module] = nn.GELU,
        iou_head_depth: int = 3,
        iou_head_hidden_dim: int = 256,
        upscaling_layer_dims: tuple[int, ...] = (64, 32),
    ) -> None:
        super().__init__()
        self.transformer_dim = transformer_dim
        self.transformer = transformer
        self.num_multimask_outputs = num_multimask_outputs
        self.num_mask_tokens = num_multimask_outputs + 1
        self.iou_token = nn.Embedding(1, transformer_dim)
        self.mask_tokens = nn.Embedding(self.num_mask_tokens, transformer_dim)

        stages = []
        in_channels = transformer_dim
        for index, out_channels in enumerate(upscaling_layer_dims):
            last = index == len(upscaling_layer_dims) - 1
            stages.append(
                nn.Sequential(
                    nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2),
                    nn.Identity() if last else nn.GroupNorm(1, out_channels),
                    activation(),
                )
            )
            in_channels = out_channels
        self.final_output_upscaling_layers = nn.ModuleList(stages)
        self.output_hypernetworks_mlps = nn.ModuleList(
            MLP(transformer_dim, transformer_dim, in_channels, 2, activation)
            for _ in range(self.num_mask_tokens)
        )
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth - 1,
            activation,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image_embeddings (B, 256, 64, 64), image_pe (1, 256, 64, 64), sparse prompt embeddings
        (B, Q, T, 256) -> logits (B, Q, K, 256, 256), iou_predictions (B, Q, K); K = 3 or 1."""
        batch, num_queries, num_prompt_tokens, channels = sparse_prompt_embeddings.shape
        sparse = sparse_prompt_embeddings.reshape(batch * num_queries, num_prompt_tokens, channels)
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse.dtype).unsqueeze(0).expand(sparse.shape[0], -1, -1)
        tokens = torch.cat([output_tokens, sparse], dim=1)

        # One copy of the image embedding per query, image-major (all queries of image 0 first).
        if num_queries > 1:
            image_embeddings = image_embeddings.repeat_interleave(num_queries, dim=0)
        token_states, image_states = self.transformer(image_embeddings, image_pe, tokens)
        iou_token_out = token_states[:, 0, :]
        mask_tokens_out = token_states[:, 1 : 1 + self.num_mask_tokens, :]

        height, width = image_embeddings.shape[-2:]
        upscaled = image_states.transpose(1, 2).reshape(-1, channels, height, width)
        for stage in self.final_output_upscaling_layers:
            upscaled = stage(upscaled)

        selected = range(1, self.num_mask_tokens) if multimask_output else range(0, 1)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in selected], dim=1
        )
        upscaled_channels, mask_height, mask_width = upscaled.shape[1:]
        masks = hyper_in @ upscaled.reshape(-1, upscaled_channels, mask_height * mask_width)
        masks = masks.reshape(batch, num_queries, len(selected), mask_height, mask_width)
        iou_predictions = self.iou_prediction_head(iou_token_out)[:, list(selected)]
        return masks, iou_predictions.reshape(batch, num_queries, len(selected))
