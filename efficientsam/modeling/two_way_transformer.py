"""Two-way transformer of the mask decoder (EfficientSAM's variant of SAM's).

Differences from SAM that change outputs: in every block after the first, the query positional
encoding is added into the query stream itself before self-attention (so it is also the value and
the residual), and the first block keeps the self-attention residual.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .common import MLP


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections and an optional downscaled width.

    Inputs (B, Nq, C), (B, Nk, C), (B, Nk, C) -> (B, Nq, C). Internal width C / downsample_rate.
    """

    def __init__(self, embedding_dim: int, num_heads: int, downsample_rate: int = 1) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.internal_dim = embedding_dim // downsample_rate
        self.num_heads = num_heads
        if self.internal_dim % num_heads:
            raise ValueError("num_heads must divide embedding_dim / downsample_rate")
        self.q_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.k_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.v_proj = nn.Linear(embedding_dim, self.internal_dim)
        self.out_proj = nn.Linear(self.internal_dim, embedding_dim)

    def _separate_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        return x.reshape(batch, tokens, self.num_heads, channels // self.num_heads).transpose(1, 2)

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """Attention on already projected inputs (..., N, internal_dim), before ``out_proj``."""
        query, key, value = (self._separate_heads(t) for t in (query, key, value))
        out = F.scaled_dot_product_attention(query, key, value)  # scale 1/sqrt(head dim)
        batch, heads, tokens, head_dim = out.shape
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.out_proj(self.attend(self.q_proj(q), self.k_proj(k), self.v_proj(v)))

    def attend_image_to_few_tokens(
        self,
        projected_query: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``residual + out_proj(attend(projected_query, k_proj(k), v_proj(v)))`` for many image
        queries over a few tokens (``residual`` (B, N, C) optional).

        projected_query (B, N, Ci) = ``q_proj`` of the image tokens; k, v (B, T, C), T small.
        Scores are computed transposed, (B, heads*T, N), with a block-diagonal key matrix so all
        heads take one matmul and the softmax runs over a non-last axis (CPU softmax over a last
        axis of ~11 is slower than the whole matmul); the value and output projections are
        folded into one (heads*T, C) matrix, so the output is a single matmul too. Each head's
        weights sum to one over the tokens, so adding ``out_proj.bias / heads`` to every row of
        that matrix adds the bias exactly once, and the matmul accumulates straight into the
        residual (no separate bias or residual pass over the N x C output).
        """
        batch, num_tokens, _ = k.shape
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        key = self.k_proj(k).view(batch, num_tokens, heads, head_dim)
        eye = torch.eye(heads, dtype=key.dtype, device=key.device)
        # (B, heads*T, heads*head_dim): row (g, t) holds token t's key of head g in head g's slot.
        block_keys = torch.einsum("bthd,hg->bgthd", key * head_dim**-0.5, eye)
        block_keys = block_keys.reshape(batch, heads * num_tokens, heads * head_dim)
        scores = block_keys @ projected_query.transpose(1, 2)  # (B, heads*T, N)
        weights = scores.view(batch, heads, num_tokens, -1).softmax(dim=2)
        weights = weights.view(batch, heads * num_tokens, -1)
        value = self.v_proj(v).view(batch, num_tokens, heads, head_dim)
        out_weight = self.out_proj.weight.view(self.embedding_dim, heads, head_dim)
        value_out = torch.einsum("bthd,chd->bhtc", value, out_weight)
        value_out = value_out.reshape(batch, heads * num_tokens, self.embedding_dim)
        if residual is None:
            return torch.baddbmm(
                self.out_proj.bias.expand(1, 1, -1), weights.transpose(1, 2), value_out
            )
        value_out = value_out + self.out_proj.bias / heads
        return torch.baddbmm(residual, weights.transpose(1, 2), value_out)

    def attend_few_queries_to_image(
        self, q: torch.Tensor, keys: torch.Tensor, key_offset: torch.Tensor
    ) -> torch.Tensor:
        """``forward(q, keys + key_pe, keys)`` for a few query tokens over many image tokens,
        without projecting the image tokens.

        q (B, T, C) with T small; keys (B, N, C); key_offset = ``k_proj(key_pe)`` (1 or B, N, Ci).
        The scores are (q_h W_k,h) keys^T + q_h . offset_h, and since each row of attention
        weights sums to one, the output is (P_h keys) W_v,h^T + b_v: O(T * heads * N * C) work
        instead of the O(N * C * Ci) of projecting every image token twice.
        """
        batch, num_tokens, channels = q.shape
        num_keys = keys.shape[1]
        heads = self.num_heads
        head_dim = self.internal_dim // heads
        query = self.q_proj(q).view(batch, num_tokens, heads, head_dim)
        key_weight = self.k_proj.weight.view(heads, head_dim, channels)
        query_in_key_space = torch.einsum("bthd,hdc->bhtc", query, key_weight)
        scores = query_in_key_space.reshape(batch, heads * num_tokens, channels) @ keys.transpose(
            1, 2
        )
        offset = key_offset.reshape(-1, num_keys, heads, head_dim).transpose(1, 2)
        scores = scores.view(batch, heads, num_tokens, num_keys) + query.transpose(1, 2) @ (
            offset.transpose(2, 3)
        )
        weights = (scores * head_dim**-0.5).softmax(dim=-1)
        pooled = weights.reshape(batch, heads * num_tokens, num_keys) @ keys
        value_weight = self.v_proj.weight.view(heads, head_dim, channels)
        values = torch.einsum(
            "bhtc,hdc->bthd", pooled.view(batch, heads, num_tokens, channels), value_weight
        )
        values = values.reshape(batch, num_tokens, heads * head_dim) + self.v_proj.bias
        return self.out_proj(values)


@dataclass(frozen=True)
class PreparedImage:
    """The query-independent part of the decoder for B images: image tokens, dense PE and the
    first block's projections of them (computed once per image, reused by every click).

    keys (B, HW, C); key_pe (1, HW, C); the first block's three projections (B, HW, Ci);
    later_block_offsets: for each later block, its projections of key_pe (1, HW, Ci), see
    :meth:`TwoWayAttentionBlock.key_pe_offsets`; final_key_offset (1, HW, Ci): the final
    attention's key projection of key_pe. Ci = C / attention downsample rate.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    token_to_image_key: torch.Tensor
    token_to_image_value: torch.Tensor
    image_to_token_query: torch.Tensor
    later_block_offsets: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    final_key_offset: torch.Tensor
    grid_size: tuple[int, int]


class TwoWayAttentionBlock(nn.Module):
    """Self-attention on tokens, token->image, MLP, image->token cross-attention (post-norm)."""

    def __init__(
        self,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int = 2048,
        activation: type[nn.Module] = nn.GELU,
        attention_downsample_rate: int = 2,
        skip_first_layer_pe: bool = False,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(embedding_dim, num_heads)
        self.norm1 = nn.LayerNorm(embedding_dim)
        self.cross_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm2 = nn.LayerNorm(embedding_dim)
        self.mlp = MLP(embedding_dim, mlp_dim, embedding_dim, 1, activation)
        self.norm3 = nn.LayerNorm(embedding_dim)
        self.norm4 = nn.LayerNorm(embedding_dim)
        self.cross_attn_image_to_token = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.skip_first_layer_pe = skip_first_layer_pe

    def image_projections(
        self, keys: torch.Tensor, key_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projections that depend on the image tokens only: token->image keys and values,
        image->token queries. keys (B, HW, C), key_pe (1, HW, C)."""
        keys_with_pe = keys + key_pe
        return (
            self.cross_attn_token_to_image.k_proj(keys_with_pe),
            self.cross_attn_token_to_image.v_proj(keys),
            self.cross_attn_image_to_token.q_proj(keys_with_pe),
        )

    def key_pe_offsets(self, key_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights' projections of the dense PE, (1, HW, Ci) each: token->image
        ``k_proj(key_pe)`` and image->token ``q_proj(key_pe)``, biases included. By linearity
        ``proj(keys + key_pe) = keys @ W^T + proj(key_pe)``, so ``keys + key_pe`` is never
        materialised."""
        return (
            self.cross_attn_token_to_image.k_proj(key_pe),
            self.cross_attn_image_to_token.q_proj(key_pe),
        )

    def forward(
        self,
        queries: torch.Tensor,
        keys: torch.Tensor,
        query_pe: torch.Tensor,
        key_pe: torch.Tensor,
        image_projections: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        key_pe_offsets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries (B*Q, T, C) prompt tokens of Q queries per image, query_pe the same shape;
        keys (B*Q, HW, C) image tokens, or (B, HW, C) when they are still the same for all
        queries of an image (first block): the image-side work is then done once per image,
        or not at all when ``image_projections`` (from :meth:`image_projections`) are given.
        Otherwise the image tokens are only ever multiplied by the few prompt tokens' vectors
        (``key_pe_offsets``, computed from key_pe when not given). key_pe (1, HW, C).
        Returns queries (B*Q, T, C), keys (B*Q, HW, C)."""
        num_images, num_queries = keys.shape[0], queries.shape[0]
        if not self.skip_first_layer_pe:
            queries = queries + query_pe
        queries = self.norm1(queries + self.self_attn(queries, queries, queries))

        # Token->image: the rows of attention are independent, so the tokens of all queries of
        # one image attend to that image's keys in one call (no per-query copy of the image).
        attention = self.cross_attn_token_to_image
        token_queries = (queries + query_pe).reshape(num_images, -1, queries.shape[-1])
        if image_projections is not None:
            token_to_image_key, token_to_image_value, image_to_token_query = image_projections
            attended = attention.out_proj(
                attention.attend(
                    attention.q_proj(token_queries), token_to_image_key, token_to_image_value
                )
            )
        else:
            if key_pe_offsets is None:
                key_pe_offsets = self.key_pe_offsets(key_pe)
            token_to_image_key_offset, image_to_token_query_offset = key_pe_offsets
            attended = attention.attend_few_queries_to_image(
                token_queries, keys, token_to_image_key_offset
            )
        queries = self.norm2(queries + attended.reshape(queries.shape))

        queries = self.norm3(queries + self.mlp(queries))

        attention = self.cross_attn_image_to_token
        if image_projections is None:
            image_to_token_query = torch.baddbmm(
                image_to_token_query_offset.to(keys.dtype),
                keys,
                attention.q_proj.weight.t().to(keys.dtype).expand(keys.shape[0], -1, -1),
            )
        tokens_with_pe = queries + query_pe
        if num_images != num_queries:
            repeats = num_queries // num_images
            image_to_token_query = image_to_token_query.repeat_interleave(repeats, dim=0)
            keys = keys.repeat_interleave(repeats, dim=0)
        keys = self.norm4(
            attention.attend_image_to_few_tokens(
                image_to_token_query, tokens_with_pe, queries, residual=keys
            )
        )
        return queries, keys


class TwoWayTransformer(nn.Module):
    """``depth`` two-way blocks and a final token->image attention.

    image (B, C, h, w) embeddings or a :class:`PreparedImage`, image_pe (1, C, h, w),
    point_embedding (B, Q, T, C) for Q queries per image -> token states (B*Q, T, C) and image
    states (B*Q, h*w, C), image-major (all queries of image 0 first).
    """

    def __init__(
        self,
        depth: int,
        embedding_dim: int,
        num_heads: int,
        mlp_dim: int,
        activation: type[nn.Module] = nn.GELU,
        attention_downsample_rate: int = 2,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.embedding_dim = embedding_dim
        self.layers = nn.ModuleList(
            TwoWayAttentionBlock(
                embedding_dim,
                num_heads,
                mlp_dim,
                activation,
                attention_downsample_rate,
                skip_first_layer_pe=(i == 0),
            )
            for i in range(depth)
        )
        self.final_attn_token_to_image = Attention(
            embedding_dim, num_heads, downsample_rate=attention_downsample_rate
        )
        self.norm_final_attn = nn.LayerNorm(embedding_dim)

    def prepare_image(self, image_embedding: torch.Tensor, image_pe: torch.Tensor) -> PreparedImage:
        """image_embedding (B, C, h, w), image_pe (1, C, h, w) -> the per-image decoder inputs."""
        keys = image_embedding.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2).contiguous()
        projections = self.layers[0].image_projections(keys, key_pe)
        later_block_offsets = tuple(layer.key_pe_offsets(key_pe) for layer in self.layers[1:])
        final_key_offset = self.final_attn_token_to_image.k_proj(key_pe)
        grid_size = (image_embedding.shape[2], image_embedding.shape[3])
        return PreparedImage(
            keys, key_pe, *projections, later_block_offsets, final_key_offset, grid_size
        )

    def forward(
        self,
        image: torch.Tensor | PreparedImage,
        image_pe: torch.Tensor,
        point_embedding: torch.Tensor,
        num_output_tokens: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_output_tokens``: return only the first tokens' states (the decoder reads the IoU
        and mask tokens only); the final attention then runs for those tokens alone."""
        if not isinstance(image, PreparedImage):
            image = self.prepare_image(image, image_pe)
        batch, num_queries, num_tokens, channels = point_embedding.shape
        queries, keys = self.run_blocks(image, point_embedding)
        point_embedding = point_embedding.reshape(batch * num_queries, num_tokens, channels)
        if num_output_tokens is not None:
            queries = queries[:, :num_output_tokens]
            point_embedding = point_embedding[:, :num_output_tokens]
        return self.final_attention(image, queries, point_embedding, keys), keys

    def run_blocks(
        self, image: PreparedImage, point_embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two-way blocks: point_embedding (B, Q, T, C) -> token states (B*Q, T, C) and
        image states (B*Q, h*w, C), before the final attention."""
        keys, key_pe = image.keys, image.key_pe
        batch, num_queries, num_tokens, channels = point_embedding.shape
        point_embedding = point_embedding.reshape(batch * num_queries, num_tokens, channels)
        queries = point_embedding
        first_projections = (
            image.token_to_image_key,
            image.token_to_image_value,
            image.image_to_token_query,
        )
        for index, layer in enumerate(self.layers):
            if index == 0:
                queries, keys = layer(queries, keys, point_embedding, key_pe, first_projections)
            else:
                offsets = image.later_block_offsets[index - 1]
                queries, keys = layer(queries, keys, point_embedding, key_pe, None, offsets)
        return queries, keys

    def final_attention(
        self,
        image: PreparedImage,
        queries: torch.Tensor,
        query_pe: torch.Tensor,
        keys: torch.Tensor,
    ) -> torch.Tensor:
        """The final token->image attention and norm for some tokens: queries and query_pe
        (N, t, C) from :meth:`run_blocks` (any subset of the tokens: each attends on its own),
        keys (N, h*w, C) -> (N, t, C)."""
        attended = self.final_attn_token_to_image.attend_few_queries_to_image(
            queries + query_pe, keys, image.final_key_offset
        )
        return self.norm_final_attn(queries + attended)
