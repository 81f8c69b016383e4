"""Fused elementwise kernels of the CUDA transformer (Triton): one pass where the torch reference makes several.

- `modulate`: affine-free LayerNorm, then (1 + scale) and shift, in one read and one write of the activations
  (the reference's layer_norm + addcmul are two passes and an intermediate; at 1024x1024 they took 7.1 ms of a
  68.6 ms H200 step). Statistics and the affine in float32, one rounding at the end.
- `attention`: RoPE on q and k in one pass each (the reference upcasts, multiplies as complex64 and casts back:
  three passes and two float32 intermediates), then the same SDPA call.
Like kernels.py, everything runs under TRITON_INTERPRET=1 on a CPU, which is how CI checks it.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

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


@functools.cache
def _rope_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rope_kernel(x_ptr, freqs_ptr, out_ptr, N, H, stride_b, stride_n, stride_h, HALF: tl.constexpr,
                    BLOCK_H: tl.constexpr):
        row = tl.program_id(0)  # (b, n) of x [B, N, H, d]: all heads of one token share its angles
        b, n = row // N, row % N
        heads = tl.arange(0, BLOCK_H)[:, None]
        j = tl.arange(0, HALF)[None, :]
        mask = heads < H
        src = x_ptr + b.to(tl.int64) * stride_b + n.to(tl.int64) * stride_n + heads * stride_h + 2 * j
        x0 = tl.load(src, mask=mask, other=0.0).to(tl.float32)  # pair (2j, 2j + 1) of each head
        x1 = tl.load(src + 1, mask=mask, other=0.0).to(tl.float32)
        cos = tl.load(freqs_ptr + n.to(tl.int64) * 2 * HALF + 2 * j)  # complex64 freqs [N, d/2] as (re, im)
        sin = tl.load(freqs_ptr + n.to(tl.int64) * 2 * HALF + 2 * j + 1)
        dst = out_ptr + row.to(tl.int64) * H * 2 * HALF + heads * 2 * HALF + 2 * j
        tl.store(dst, (x0 * cos - x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + 1, (x1 * cos + x0 * sin).to(out_ptr.dtype.element_ty), mask=mask)

    return rope_kernel


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x [B, N, H, d] (any strides, unit along d) by freqs complex64 [N, d/2], in
    float32 -> a contiguous [B, N, H, d] in x's dtype."""
    import triton

    b, n, h, d = x.shape
    if x.stride(-1) != 1 or freqs.shape != (n, d // 2) or freqs.dtype != torch.complex64:
        raise ValueError(f"rope: x [B, N, H, d] with unit stride along d and freqs complex64 [N, d/2] = "
                         f"{(n, d // 2)}, got {tuple(x.shape)} and {freqs.dtype} {tuple(freqs.shape)}")
    out = torch.empty(x.shape, device=x.device, dtype=x.dtype)
    _rope_kernel()[(b * n,)](x, torch.view_as_real(freqs.contiguous()), out, n, h, x.stride(0), x.stride(1),
                             x.stride(2), HALF=d // 2, BLOCK_H=triton.next_power_of_2(h))
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """`bonsai.backends.torch.transformer.attention` with the RoPE fused: q, k, v [B, N, H, d] -> [B, N, H*d]."""
    q, k, v = (t.transpose(1, 2) for t in (rope(q, freqs), rope(k, freqs), v))  # [B, H, N, d] views
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


FUSED_OPS = Ops(modulate=modulate, attention=attention)
