"""Seeded random weights of the right shapes, for benchmarks and tests that need a model of a
variant for which no real checkpoint is reachable (EfficientSAM-S here)."""

from __future__ import annotations

import torch

from efficientsam.build import build_efficient_sam
from efficientsam.modeling import EfficientSam


def random_state_dict(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors of the model's shapes, drawn the way the fixture README describes (norm
    weights near 1, small biases, fan-in scaled Linear/Conv weights, wide embeddings), so that no
    path is degenerate. Buffers (the PE Gaussian matrix) are standard normal."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator)
            if param_name == "bias":
                values = noise * 0.05
            elif isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or param.dim() == 1:
                values = 1 + noise * 0.1
            elif isinstance(module, torch.nn.ConvTranspose2d):
                values = noise / param.shape[0] ** 0.5
            elif isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                values = noise / param[0].numel() ** 0.5
            else:  # nn.Embedding tables and the position embedding
                values = noise * 0.5
            state[f"{module_name}.{param_name}" if module_name else param_name] = values
    for name, buffer in model.state_dict().items():
        state.setdefault(name, torch.randn(buffer.shape, generator=generator))
    return state


def random_model(variant: str, seed: int) -> EfficientSam:
    """EfficientSAM ``variant`` ("ti" or "s") in eval mode on the CPU, every tensor of its state
    dict from :func:`random_state_dict` (the result depends only on ``variant`` and ``seed``)."""
    model = build_efficient_sam(variant)
    model.load_state_dict(random_state_dict(model, seed))
    return model.eval()
