"""Prompt encoder: points and box corners -> sparse prompt embeddings (no dense/mask prompts)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..prompts import (  # noqa: F401  (re-exported: the label values of the prompt format)
    LABEL_BOX_BOTTOM_RIGHT,
    LABEL_BOX_TOP_LEFT,
    LABEL_NEGATIVE,
    LABEL_PADDING,
    LABEL_POSITIVE,
)
from ..utils import tensor_version


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of (x, y) coordinates in [0, 1].

    c -> 2c - 1, (x, y) @ G (2, F), * 2 pi, concat(sin, cos) -> 2F features (sin half first).
    """

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn((2, num_pos_feats)))

    def encode(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 2) coordinates in [0, 1] as (x, y) -> (..., 2F) features."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix.to(coords.dtype)
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: tuple[int, int]) -> torch.Tensor:
        """Dense encoding of an (h, w) grid of pixel centres -> (2F, h, w)."""
        height, width = size
        device = self.positional_encoding_gaussian_matrix.device
        grid = torch.ones((height, width), device=device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / height
        x_embed = (grid.cumsum(dim=1) - 0.5) / width
        encoding = self.encode(torch.stack([x_embed, y_embed], dim=-1))
        return encoding.permute(2, 0, 1)


class PromptEncoder(nn.Module):
    """Encodes prompt points given in the model's input frame (1024x1024 pixels).

    Input points (..., N, 2) as (x, y) pixels of the 1024x1024 frame, labels (..., N) with
    -1 padding, 0 negative, 1 positive, 2 box top-left, 3 box bottom-right. Output (..., N, 256).
    Negative points get no learned embedding (positional encoding only); padding points keep their
    positional encoding plus the ``invalid_points`` embedding.
    """

    def __init__(
        self,
        embed_dim: int = 256,
        image_embedding_size: tuple[int, int] = (64, 64),
        input_image_size: tuple[int, int] = (1024, 1024),
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.image_embedding_size = image_embedding_size
        self.input_image_size = input_image_size
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.invalid_points = nn.Embedding(1, embed_dim)
        self.point_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_top_left_embeddings = nn.Embedding(1, embed_dim)
        self.bbox_bottom_right_embeddings = nn.Embedding(1, embed_dim)
        self._dense_pe: torch.Tensor | None = None
        self._dense_pe_key: tuple | None = None

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, 256, 64, 64).

        Input-independent: cached until the Gaussian matrix changes (in place, by a state-dict
        load, or by a move to another device/dtype)."""
        matrix = self.pe_layer.positional_encoding_gaussian_matrix
        key = tensor_version(matrix)
        if key is None:
            return self.pe_layer(self.image_embedding_size).unsqueeze(0)
        if self._dense_pe is None or self._dense_pe_key != key:
            # A normal (not inference-mode) tensor, so training may use it after inference did.
            with torch.inference_mode(False), torch.no_grad():
                self._dense_pe = self.pe_layer(self.image_embedding_size).unsqueeze(0)
            self._dense_pe_key = key
        return self._dense_pe

    def forward(self, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        points = points + 0.5  # pixel centres
        input_height, input_width = self.input_image_size
        normalised = torch.stack([points[..., 0] / input_width, points[..., 1] / input_height], -1)
        embeddings = self.pe_layer.encode(normalised)
        labels = labels.unsqueeze(-1)
        for value, embedding in (
            (LABEL_PADDING, self.invalid_points),
            (LABEL_POSITIVE, self.point_embeddings),
            (LABEL_BOX_TOP_LEFT, self.bbox_top_left_embeddings),
            (LABEL_BOX_BOTTOM_RIGHT, self.bbox_bottom_right_embeddings),
        ):
            embeddings = embeddings + (labels == value).to(embeddings.dtype) * embedding.weight[0]
        return embeddings
