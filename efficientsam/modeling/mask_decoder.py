"""Mask decoder: two-way transformer, transposed-conv upscaling and hypernetwork heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP
from .two_way_transformer import PreparedImage, TwoWayTransformer


@dataclass(frozen=True)
class DecodedTokens:
    """The decoder's work for B images x Q queries (N = B*Q, image-major) up to the IoU
    predictions, before any mask: iou_predictions (B, Q, K) raw, K = len(candidates);
    token_states (N, T, C) and token_pe (N, T, C) after the transformer's blocks; image_states
    (N, h*w, C) channels-last; prepared: the image's :class:`PreparedImage`; candidates: the
    mask token index (0..3) of each of the K candidates. :meth:`MaskDecoder.candidate_masks`
    turns chosen candidates of chosen queries into logits."""

    iou_predictions: torch.Tensor
    token_states: torch.Tensor
    token_pe: torch.Tensor
    image_states: torch.Tensor
    prepared: PreparedImage
    candidates: tuple[int, ...]


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
        self.upscaling_chunk_rows = 2048  # last-stage input rows per chunk (~1 MiB of output)
        self.iou_prediction_head = MLP(
            transformer_dim,
            iou_head_hidden_dim,
            self.num_mask_tokens,
            iou_head_depth - 1,
            activation,
        )

    def forward(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
        upscale: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor] | DecodedTokens:
        """image_embeddings (B, 256, 64, 64) or prepared by ``transformer.prepare_image``,
        image_pe (1, 256, 64, 64), sparse prompt embeddings (B, Q, T, 256)
        -> logits (B, Q, K, 256, 256), iou_predictions (B, Q, K); K = 3 or 1.
        ``upscale=False``: :meth:`decode_tokens` instead (IoU predictions, no masks yet)."""
        if not upscale:
            return self.decode_tokens(
                image_embeddings, image_pe, sparse_prompt_embeddings, multimask_output
            )
        batch, num_queries, _, _ = sparse_prompt_embeddings.shape
        tokens = self._tokens(sparse_prompt_embeddings)
        # The image embedding is not tiled per query: the transformer shares it (image-major).
        prepared = self._prepared(image_embeddings, image_pe)
        token_states, image_states = self.transformer(
            prepared, image_pe, tokens, num_output_tokens=1 + self.num_mask_tokens
        )
        iou_token_out = token_states[:, 0, :]
        mask_tokens_out = token_states[:, 1 : 1 + self.num_mask_tokens, :]

        selected = self._candidates(multimask_output)
        hyper_in = torch.stack(
            [self.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in selected], dim=1
        )
        height, width = prepared.grid_size
        masks = self.upscale_and_predict_masks(image_states, hyper_in, height, width)
        masks = masks.reshape(batch, num_queries, len(selected), *masks.shape[-2:])
        iou_predictions = self.iou_prediction_head(iou_token_out)[:, selected]
        return masks, iou_predictions.reshape(batch, num_queries, len(selected))

    def _tokens(self, sparse_prompt_embeddings: torch.Tensor) -> torch.Tensor:
        """(B, Q, T, C) prompt tokens -> (B, Q, 1 + 4 + T, C): [IoU, 4 mask tokens, prompts]."""
        batch, num_queries, _, _ = sparse_prompt_embeddings.shape
        output_tokens = torch.cat([self.iou_token.weight, self.mask_tokens.weight], dim=0)
        output_tokens = output_tokens.to(sparse_prompt_embeddings.dtype)
        output_tokens = output_tokens.expand(batch, num_queries, -1, -1)
        return torch.cat([output_tokens, sparse_prompt_embeddings], dim=2)

    def _prepared(
        self, image_embeddings: torch.Tensor | PreparedImage, image_pe: torch.Tensor
    ) -> PreparedImage:
        if isinstance(image_embeddings, PreparedImage):
            return image_embeddings
        return self.transformer.prepare_image(image_embeddings, image_pe)

    def _candidates(self, multimask_output: bool) -> list[int]:
        """Mask token indices of the output candidates: 1..3 (multimask) or 0."""
        return list(range(1, self.num_mask_tokens) if multimask_output else range(0, 1))

    def decode_tokens(
        self,
        image_embeddings: torch.Tensor | PreparedImage,
        image_pe: torch.Tensor,
        sparse_prompt_embeddings: torch.Tensor,
        multimask_output: bool,
    ) -> DecodedTokens:
        """The IoU predictions of :meth:`forward` (same inputs) without computing any mask: the
        transformer's blocks, then its final attention for the IoU token alone (tokens attend
        to the image independently). :meth:`candidate_masks` finishes chosen candidates, so a
        caller that filters on predicted IoU computes only the masks it keeps."""
        batch, num_queries, _, _ = sparse_prompt_embeddings.shape
        tokens = self._tokens(sparse_prompt_embeddings)
        prepared = self._prepared(image_embeddings, image_pe)
        token_states, image_states = self.transformer.run_blocks(prepared, tokens)
        token_pe = tokens.reshape(token_states.shape)
        iou_token_out = self.transformer.final_attention(
            prepared, token_states[:, :1], token_pe[:, :1], image_states
        )[:, 0]
        selected = self._candidates(multimask_output)
        iou_predictions = self.iou_prediction_head(iou_token_out)[:, selected]
        return DecodedTokens(
            iou_predictions.reshape(batch, num_queries, len(selected)),
            token_states,
            token_pe,
            image_states,
            prepared,
            tuple(selected),
        )

    def candidate_masks(
        self, decoded: DecodedTokens, queries: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Low-res logits of chosen candidates: queries (n,) int64 indices into the decoded
        N queries, candidates (n, k) indices into the K candidates -> (n, k, 4h, 4w) (256x256),
        the values :meth:`forward` gives for them."""
        states, pe, image_states = decoded.token_states, decoded.token_pe, decoded.image_states
        if len(queries) < len(states):
            states, pe, image_states = states[queries], pe[queries], image_states[queries]
        # final attention for the mask tokens of the K candidates only
        mask_tokens = [1 + i for i in decoded.candidates]
        mask_tokens_out = self.transformer.final_attention(
            decoded.prepared, states[:, mask_tokens], pe[:, mask_tokens], image_states
        )
        hyper_in = torch.stack(
            [
                self.output_hypernetworks_mlps[i](mask_tokens_out[:, j])
                for j, i in enumerate(decoded.candidates)
            ],
            dim=1,
        )  # (n, K, C_up)
        index = candidates[:, :, None].expand(-1, -1, hyper_in.shape[2])
        hyper_in = hyper_in.gather(1, index)  # (n, k, C_up)
        return self.upscale_and_predict_masks(image_states, hyper_in, *decoded.prepared.grid_size)

    @staticmethod
    def _sub_pixel_conv(features: torch.Tensor, conv: nn.ConvTranspose2d) -> torch.Tensor:
        """ConvTranspose2d(k=2, s=2) of channels-last rows: (P, C_in) -> (P, 2*2*C_out), output
        columns ordered (a, b, C_out) for the sub-pixel (a, b) of each input pixel."""
        in_channels, out_channels = conv.weight.shape[:2]
        weight = conv.weight.permute(0, 2, 3, 1).reshape(in_channels, 4 * out_channels)
        bias = conv.bias.repeat(4)
        return torch.addmm(
            bias.to(features.dtype), features.reshape(-1, in_channels), weight.to(features.dtype)
        )

    @staticmethod
    def _normalise(features: torch.Tensor, norm: nn.Module, num: int) -> torch.Tensor:
        """GroupNorm(1, C) of channels-last features of ``num`` samples: statistics over all
        pixels and channels of a sample (biased variance), then the per-channel affine.
        Returns (num, P, C). (layer_norm over the flattened sample is the same normalisation and
        ~6x faster on CPU than var_mean, which reduces a million values single-threaded.)"""
        if not isinstance(norm, nn.GroupNorm) or norm.num_groups != 1:
            raise NotImplementedError(f"unsupported upscaling norm {norm!r}")
        flat = features.reshape(num, -1)
        normalised = F.layer_norm(flat, flat.shape[1:], eps=norm.eps)
        weight, bias = norm.weight.to(features.dtype), norm.bias.to(features.dtype)
        return torch.addcmul(bias, normalised.reshape(num, -1, norm.num_channels), weight)

    def upscale_and_predict_masks(
        self, image_states: torch.Tensor, hyper_in: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Upscaling stages + hypernetwork product.

        image_states (N, h*w, C) channels-last, hyper_in (N, K, 32) -> logits (N, K, 4h, 4w).

        Same maths as ConvTranspose2d(k=2, s=2) -> GroupNorm(1) -> GELU -> ConvTranspose2d ->
        GELU -> (hyper_in @ features), computed channels-last: a k=2, s=2 transposed conv maps
        each input pixel independently to a 2x2 block, i.e. one matmul with the weight seen as
        (C_in, 2*2*C_out). The sub-pixel positions stay as extra axes, GroupNorm(1) (statistics
        over all pixels and channels) does not care about pixel order, and only the small
        (N, K, 4h, 4w) result is rearranged into image order.
        """
        num = image_states.shape[0]
        features = image_states.reshape(-1, image_states.shape[-1])  # (N*h*w, C) channels-last
        stages = list(self.final_output_upscaling_layers)
        for conv, norm, activation in stages[:-1]:
            features = activation(self._normalise(self._sub_pixel_conv(features, conv), norm, num))
        # The last (largest) stage and the hypernetwork product run on row chunks that stay in
        # the CPU cache instead of streaming a (N, 16*h*w, 4*32) tensor through memory 3 times.
        conv, norm, activation = stages[-1]
        if not isinstance(norm, nn.Identity):
            raise NotImplementedError("the last upscaling stage must not have a norm")
        out_channels = conv.weight.shape[1]
        features = features.reshape(num, -1, features.shape[-1])  # (N, P, C)
        pixels_per_chunk = max(256, self.upscaling_chunk_rows // num)
        pieces = []
        for pixels in features.split(pixels_per_chunk, dim=1):
            upscaled = activation(self._sub_pixel_conv(pixels, conv))  # (N*c, 4*C_out)
            upscaled = upscaled.reshape(num, -1, out_channels).transpose(1, 2)
            pieces.append(hyper_in @ upscaled)  # (N, K, 4*c)
        masks = torch.cat(pieces, dim=2)  # (N, K, pixels) with pixel index (y, x, (a1, b1), ...)
        sub_pixel_axes = len(stages)
        num_masks = hyper_in.shape[1]
        shape = [num, num_masks, height, width] + [2, 2] * sub_pixel_axes
        masks = masks.reshape(shape)
        # -> (N, K, y, a1, a2, ..., x, b1, b2, ...)
        row_axes = [2] + [4 + 2 * i for i in range(sub_pixel_axes)]
        col_axes = [3] + [5 + 2 * i for i in range(sub_pixel_axes)]
        masks = masks.permute([0, 1, *row_axes, *col_axes])
        scale = 2**sub_pixel_axes
        return masks.reshape(num, num_masks, height * scale, width * scale)
