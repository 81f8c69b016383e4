"""Triton kernel: packed binary/ternary codes * group scales -> dense bf16/fp16/fp32 matrix.

The fast path keeps only the packed codes resident and expands one layer at a time into a reused
scratch buffer, then lets cuBLAS do the GEMM. At diffusion token counts (M = 1k-5k) the GEMM is
compute-bound on Hopper, so a dense tensor-core GEMM beats in-loop unpacking; the expansion is a
pure bandwidth pass (read 1-2 bits, write 16 bits per weight).

The kernel also runs under TRITON_INTERPRET=1 on CPU, which is how CI checks it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _expand_kernel():
    # Built lazily: importing triton (and decorating) at module import would be import-time work.
    import triton
    import triton.language as tl

    @triton.jit
    def expand(packed_ptr, scales_ptr, out_ptr, N, K,
               BITS: tl.constexpr, GROUP: tl.constexpr, TERNARY: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        PER_BYTE: tl.constexpr = 8 // BITS
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        mask = (rows[:, None] < N) & (cols[None, :] < K)
        rows64 = rows.to(tl.int64)
        # Codes are LSB-first along K: weight j sits in byte j // PER_BYTE at bit (j % PER_BYTE) * BITS.
        byte = tl.load(packed_ptr + rows64[:, None] * (K // PER_BYTE) + (cols // PER_BYTE)[None, :],
                       mask=mask, other=0).to(tl.int32)
        q = (byte >> ((cols % PER_BYTE) * BITS)[None, :]) & ((1 << BITS) - 1)
        if TERNARY:
            t = q - 1
        else:
            t = 2 * q - 1
        s = tl.load(scales_ptr + rows64[:, None] * (K // GROUP) + (cols // GROUP)[None, :], mask=mask, other=0.0)
        # t is -1/0/+1, so t * s in fp32 then one rounding equals t * round(s): same as the torch reference.
        w = t.to(tl.float32) * s.to(tl.float32)
        tl.store(out_ptr + rows64[:, None] * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)

    return expand


def expand_lowbit(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
                  out: torch.Tensor) -> torch.Tensor:
    """Write W = t * s into `out` [N, K] (any float dtype, contiguous).

    packed: uint8 [N, K * bits / 8], LSB-first along K (bits 2: q = t + 1; bits 1: q = (b + 1) / 2).
    scales: float [N, K // group_size].
    """
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 (binary) or 2 (ternary), got {bits}")
    n, k = packed.shape[0], in_features
    if packed.shape != (n, k * bits // 8) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8 [{n}, {k * bits // 8}], got {packed.dtype} {tuple(packed.shape)}")
    if k % group_size or scales.shape != (n, k // group_size):
        raise ValueError(f"scales must be [{n}, {k // group_size}] for in_features={k}, got {tuple(scales.shape)}")
    if out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor, got {tuple(out.shape)}")
    block_n, block_k = 16, 256
    grid = ((n + block_n - 1) // block_n, (k + block_k - 1) // block_k)
    _expand_kernel()[grid](packed.contiguous(), scales.contiguous(), out, n, k,
                           BITS=bits, GROUP=group_size, TERNARY=bits == 2,
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out
