"""Plain ViT image encoder of EfficientSAM (global attention in every block) plus SAM's neck."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..utils import tensor_version
from .common import LayerNorm2d

ATTENTION_IMPLEMENTATIONS = ("sdpa", "explicit")


class PatchEmbed(nn.Module):
    """(B, 3, H, W) image -> (B, C, H/16, W/16) patch features (conv with bias)."""

    def __init__(self, patch_size: int, in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Attention(nn.Module):
    """Multi-head global self-attention with a fused qkv projection (q | k | v, then heads).

    ``implementation`` is ``"sdpa"`` (``F.scaled_dot_product_attention``: never materialises the
    N x N attention matrix) or ``"explicit"`` (softmax(QK^T)V as in the reference code, kept as
    the benchmark baseline).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.implementation = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, num_tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, num_tokens, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, N, head_dim)
        if self.implementation == "sdpa":
            out = F.scaled_dot_product_attention(query, key, value, scale=self.scale)
        else:
            attention = (query @ key.transpose(-2, -1)) * self.scale
            out = attention.softmax(dim=-1) @ value
        out = out.transpose(1, 2).reshape(batch, num_tokens, channels)
        return self.proj(out)


class Mlp(nn.Module):
    """ViT feed-forward: fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); LN eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """(B, 3, 1024, 1024) normalised image -> (B, 256, 64, 64) image embeddings.

    The absolute position embedding is stored at the 14x14 pretraining grid (+ an unused cls slot)
    and bicubically resized to 64x64. The resized copy is cached and recomputed only when the
    parameter changes (tracked by its in-place version counter), or on every call when gradients
    flow into it.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_channels: int = 3,
        patch_embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        neck_dims: tuple[int, ...] = (256,),
        pretrain_img_size: int = 224,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.image_embedding_size = img_size // patch_size
        self.transformer_output_dim = neck_dims[-1]
        self.pretrain_grid_size = pretrain_img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_channels, patch_embed_dim)
        num_positions = self.pretrain_grid_size**2 + 1  # + the (unused) cls slot
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, patch_embed_dim))
        self.blocks = nn.ModuleList(
            Block(patch_embed_dim, num_heads, mlp_ratio) for _ in range(depth)
        )
        self.neck = nn.Sequential(
            nn.Conv2d(patch_embed_dim, neck_dims[0], kernel_size=1, bias=False),
            LayerNorm2d(neck_dims[0]),
            nn.Conv2d(neck_dims[0], neck_dims[0], kernel_size=3, padding=1, bias=False),
            LayerNorm2d(neck_dims[0]),
        )
        self._resized_pos_embed: torch.Tensor | None = None
        self._resized_pos_embed_key: tuple | None = None

    def set_attention_implementation(self, implementation: str) -> None:
        """Switch every block between ``"sdpa"`` (default) and ``"explicit"`` attention."""
        if implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, "
                f"got {implementation!r}"
            )
        for block in self.blocks:
            block.attn.implementation = implementation

    def resized_pos_embed(self) -> torch.Tensor:
        """The position embedding at the token grid, (1, 64, 64, C) channels-last."""
        pos_embed = self.pos_embed
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            return self._resize_pos_embed(pos_embed)
        key = tensor_version(pos_embed)
        if key is None:
            return self._resize_pos_embed(pos_embed)
        if self._resized_pos_embed is None or self._resized_pos_embed_key != key:
            # A normal (not inference-mode) tensor, so training may use it after inference did.
            with torch.inference_mode(False), torch.no_grad():
                self._resized_pos_embed = self._resize_pos_embed(pos_embed)
            self._resized_pos_embed_key = key
        return self._resized_pos_embed

    def _resize_pos_embed(self, pos_embed: torch.Tensor) -> torch.Tensor:
        grid = self.pretrain_grid_size
        channels = pos_embed.shape[-1]
        grid_embed = pos_embed[:, 1:].reshape(1, grid, grid, channels).permute(0, 3, 1, 2)
        size = self.image_embedding_size
        if grid != size:
            grid_embed = F.interpolate(
                grid_embed, size=(size, size), mode="bicubic", align_corners=False
            )
        return grid_embed.permute(0, 2, 3, 1)

    def forward(self, x: torch.Tensor, blocks_dtype: torch.dtype | None = None) -> torch.Tensor:
        """x (B, 3, 1024, 1024) normalised -> (B, 256, 64, 64).

        ``blocks_dtype`` (e.g. ``torch.bfloat16``): run the transformer blocks and the neck under
        autocast to that dtype (matmuls and attention in it; the residual stream, layer norms'
        statistics and softmax accumulation stay float32). The patch embedding always runs in
        float32 (it sees the 8-bit image, which bfloat16 would round to 3 significant digits),
        and the output is float32. None: float32 unless an outer autocast says otherwise.
        """
        if x.shape[2] != self.img_size or x.shape[3] != self.img_size:
            raise ValueError(
                f"image encoder expects (B, 3, {self.img_size}, {self.img_size}) input, "
                f"got {tuple(x.shape)}"
            )
        with torch.autocast(x.device.type, enabled=False):
            x = self.patch_embed(x.float()).permute(0, 2, 3, 1)  # (B, 64, 64, C)
            x = x + self.resized_pos_embed().to(x.dtype)
        batch, height, width, channels = x.shape
        x = x.reshape(batch, height * width, channels)
        fast = blocks_dtype is not None and blocks_dtype != torch.float32
        # without a fast dtype, an outer autocast (training's mixed precision) is left alone
        blocks_context = (
            torch.autocast(x.device.type, dtype=blocks_dtype) if fast else contextlib.nullcontext()
        )
        with blocks_context:
            for block in self.blocks:
                x = block(x)
            x = x.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
            return self.neck(x).float()
