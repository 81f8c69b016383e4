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
