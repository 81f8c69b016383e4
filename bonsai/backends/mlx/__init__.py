"""MLX backend (Apple Silicon; MLX-CPU on Linux): stock `mx.quantized_matmul` over the released low-bit tensors.

Importing this package does not import MLX; the helpers below import it when called.
"""

from __future__ import annotations

DTYPES = ("float16", "bfloat16", "float32")


def mx_dtype(name):
    """"float16" | "bfloat16" | "float32" (or an mx.Dtype) -> mx.Dtype."""
    import mlx.core as mx

    if isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {name!r}")
    return getattr(mx, name)


def to_mx(t, dtype=None):
    """torch tensor (any device/dtype) or numpy array -> mx.array, optionally cast to `dtype`."""
    import mlx.core as mx
    import numpy as np

    if isinstance(t, mx.array):
        a = t
    elif isinstance(t, np.ndarray):
        a = mx.array(t)
    else:
        import torch

        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            # numpy has no bf16; fp32 holds every bf16 value exactly.
            a = mx.array(t.float().numpy()).astype(mx.bfloat16)
        else:
            a = mx.array(t.numpy())
    return a if dtype is None else a.astype(mx_dtype(dtype))
