"""Small building blocks shared by the network parts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis of a (B, C, H, W) tensor (biased variance, per-pixel)."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # layer_norm over the last axis of the channels-last view is the same maths, one fused op.
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class MLP(nn.Module):
    """Linear layers with an activation after each hidden one and none after the output one.

    Parameters are stored as ``layers.{k}.0`` (hidden Linear, activation at index 1) and ``fc``
    (output Linear), the layout of the official EfficientSAM checkpoints.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        output_dim: int,
        num_hidden_layers: int,
        activation: type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        layers = []
        in_features = input_dim
        for _ in range(num_hidden_layers):
            layers.append(nn.Sequential(nn.Linear(in_features, hidden_dim), activation()))
            in_features = hidden_dim
        self.layers = nn.ModuleList(layers)
        self.fc = nn.Linear(in_features, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc(x)
