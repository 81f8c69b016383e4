"""Strict MLX loading: the project's key/shape check, then `Module.load_weights(strict=True)`, the file named."""

from __future__ import annotations

from typing import Mapping

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from ...errors import BonsaiValueError
from ...state import check_state


def to_numpy(a: mx.array) -> np.ndarray:
    """mx.array -> numpy (no copy where numpy has the dtype); bf16, which numpy lacks, as exact float32."""
    return np.asarray(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def check_quantizable(model: nn.Module, weights: Mapping[str, mx.array], group_size: int, source) -> None:
    """Before `nn.quantize`: every module the checkpoint quantizes (it has `<path>.scales`) must split its inputs
    into groups of `group_size`, and its scales must have the shape that gives; BonsaiValueError naming `source`."""
    expected, given = {}, {}
    for path, module in model.named_modules():
        key = f"{path}.scales"
        if key in weights and hasattr(module, "weight"):
            out, k = module.weight.shape
            if k % group_size:
                raise BonsaiValueError(f"{source}: {path} has {k} inputs, not a multiple of the quantization "
                                       f"group_size {group_size}")
            expected[key], given[key] = (out, k // group_size), tuple(weights[key].shape)
    check_state(source, expected, given, "quantized scales")


def load_strict(model: nn.Module, weights: Mapping[str, mx.array], source, what: str = "weights") -> nn.Module:
    """Load `weights` (flat key -> mx.array) into `model` and evaluate them.

    Raises BonsaiValueError, one line naming `source` first (bonsai.state.check_state's format), when the keys or
    shapes differ from the model's parameters.
    """
    expected = {k: v.shape for k, v in tree_flatten(model.parameters())}
    check_state(source, expected, {k: v.shape for k, v in weights.items()}, what)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # what check_state does not see, e.g. a value that is not an mx.array
        raise BonsaiValueError(f"{source}: {what}: {' '.join(str(e).split())}") from None
    mx.eval(model.parameters())
    return model
