"""LoRA at run time beside any linear (packed low-bit or dense): y = base(x) + up @ (down @ x), weights untouched.

Every adapter loaded on a layer is one branch: their downs are stacked along the rank and their ups carry the
strength and scale, so any number of adapters costs two small GEMMs per layer.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...lora import Lora


class LoraLinear(nn.Module):
    """`base` plus a low-rank branch. down [R, in], up [out, R], already scaled."""

    def __init__(self, base: nn.Module, down: torch.Tensor, up: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("down", down)
        self.register_buffer("up", up)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(x, self.down), self.up)


def stacked(adapters: Sequence[tuple[Lora, float]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(Lora, strength) pairs -> module name -> (down [sum r, in], up [out, sum r] * strength * scale), float32."""
    parts: dict[str, list] = {}
    for lora, strength in adapters:
        for name, layer in lora.layers.items():
            parts.setdefault(name, []).append((layer.down.float(), layer.up.float() * (strength * layer.scale)))
    return {name: (torch.cat([d for d, _ in p]), torch.cat([u for _, u in p], dim=1)) for name, p in parts.items()}


def set_adapters(model: nn.Module, adapters: Sequence[tuple[Lora, float]], device, dtype) -> None:
    """Make the LoRA branches of `model` exactly `adapters` (an empty list restores the plain model).

    The new branches are built first; the model changes only once they all exist.
    """
    branches = {name: (d.to(device, dtype), u.to(device, dtype)) for name, (d, u) in stacked(adapters).items()}
    for name in branches:
        model.get_submodule(name)  # raises for a module the model does not have, before anything changes
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            _replace(model, name, module.base)
    for name, (down, up) in branches.items():
        _replace(model, name, LoraLinear(model.get_submodule(name), down, up))


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
