"""LoRA at run time beside any MLX linear (QuantizedLinear or Linear): y = base(x) + up @ (down @ x).

Mirrors bonsai/backends/torch/lora.py: one branch per layer with every adapter stacked along the rank.
"""

from __future__ import annotations

from typing import Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from ...lora import Lora
from ..torch.lora import stacked
from . import to_mx


class LoraLinear(nn.Module):
    """`base` plus a low-rank branch. down [R, in], up [out, R], already scaled."""

    def __init__(self, base: nn.Module, down: mx.array, up: mx.array):
        super().__init__()
        self.base = base
        self.down = down
        self.up = up

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + (x @ self.down.T) @ self.up.T


def set_adapters(model: nn.Module, adapters: Sequence[tuple[Lora, float]], dtype) -> None:
    """Make the LoRA branches of `model` exactly `adapters` (an empty list restores the plain model)."""
    branches = {name: (to_mx(d).astype(dtype), to_mx(u).astype(dtype)) for name, (d, u) in stacked(adapters).items()}
    modules = dict(model.named_modules())
    missing = [name for name in branches if name not in modules]
    if missing:
        raise KeyError(f"the model has no modules {missing[:4]}")
    plain = [(name, m.base) for name, m in modules.items() if isinstance(m, LoraLinear)]
    if plain:
        model.update_modules(tree_unflatten(plain))
    modules = dict(model.named_modules())
    if branches:
        model.update_modules(tree_unflatten([(name, LoraLinear(modules[name], d, u))
                                             for name, (d, u) in branches.items()]))
    mx.eval(model.parameters())
