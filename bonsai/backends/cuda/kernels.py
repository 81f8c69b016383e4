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
        # One tile of BLOCK_N rows x BLOCK_K inputs; BLOCK_K is a multiple of GROUP that divides K, so only
        # rows need a mask. Each packed byte is read once and split in registers (no gathers).
        PER: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_K // PER
        G: tl.constexpr = BLOCK_K // GROUP
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = (rows < N)[:, None]
        rows64 = rows.to(tl.int64)[:, None]
        bcols = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
        byte = tl.load(packed_ptr + rows64 * (K // PER) + bcols[None, :], mask=rmask, other=0).to(tl.int32)
        # Codes are LSB-first along K: weight b * PER + p sits in byte b at bit p * BITS.
        shifts = tl.arange(0, PER) * BITS
        q = (byte[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1)  # [BLOCK_N, BLOCK_B, PER]
        if TERNARY:
            t = q - 1
        else:
            t = 2 * q - 1
        gcols = tl.program_id(1) * G + tl.arange(0, G)
        s = tl.load(scales_ptr + rows64 * (K // GROUP) + gcols[None, :], mask=rmask, other=0.0)  # [BLOCK_N, G]
        # t is -1/0/+1, so t * s in fp32 then one rounding equals t * round(s): same as the torch reference.
        w = tl.reshape(t.to(tl.float32), (BLOCK_N, G, GROUP)) * s.to(tl.float32)[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows64 * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=rmask)

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
    if group_size & (group_size - 1) or group_size < 8:
        raise ValueError(f"group_size must be a power of two >= 8, got {group_size}")
    block_k = next(b for b in (4 * group_size, 2 * group_size, group_size) if k % b == 0)
    block_n = max(1, min(32, 16384 // block_k))
    grid = ((n + block_n - 1) // block_n, k // block_k)
    _expand_kernel()[grid](packed.contiguous(), scales.contiguous(), out, n, k,
                           BITS=bits, GROUP=group_size, TERNARY=bits == 2,
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=8)
    return out
