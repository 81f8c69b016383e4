"""Fused elementwise kernels of the CUDA transformer (Triton): one pass where the torch reference makes several.

- `modulate`: affine-free LayerNorm, then (1 + scale) and shift, in one read and one write of the activations
  (the reference's layer_norm + addcmul are two passes and an intermediate; at 1024x1024 they took 7.1 ms of a
  68.6 ms H200 step). Statistics and the affine in float32, one rounding at the end.
Like kernels.py, everything runs under TRITON_INTERPRET=1 on a CPU, which is how CI checks it.
"""

from __future__ import annotations

import functools

import torch

from ..torch.transformer import Ops


@functools.cache
def _modulate_kernel():
    # Built lazily: importing triton at module import would be import-time work.
    import triton
    import triton.language as tl

    @triton.jit
    def modulate_kernel(x_ptr, shift_ptr, scale_ptr, out_ptr, N, D, shift_stride, scale_stride, eps,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0)  # a row of x [B * N, D]; its batch picks the shift and scale rows
        b = row // N
        cols = tl.arange(0, BLOCK)
        mask = cols < D
        base = row.to(tl.int64) * D
        x = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / D
        xc = tl.where(mask, x - mean, 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
        scale = tl.load(scale_ptr + b * scale_stride + cols, mask=mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * shift_stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + base + cols, (y * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)

    return modulate_kernel


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm(x) * (1 + scale) + shift: x [B, N, D]; shift, scale [B, 1, D] (views of the modulation output)."""
    import triton

    b, n, d = x.shape
    if shift.shape != (b, 1, d) or scale.shape != (b, 1, d) or shift.stride(-1) != 1 or scale.stride(-1) != 1:
        raise ValueError(f"modulate: shift and scale must be [B, 1, D] = {(b, 1, d)} with unit stride along D, "
                         f"got {tuple(shift.shape)} and {tuple(scale.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    block = triton.next_power_of_2(d)
    _modulate_kernel()[(b * n,)](x, shift, scale, out, n, d, shift.stride(0), scale.stride(0), eps, BLOCK=block,
                                 num_warps=8 if block >= 2048 else 4)
    return out


FUSED_OPS = Ops(modulate=modulate)
