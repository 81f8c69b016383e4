"""Triton kernels of the CUDA fast path, over packed binary/ternary codes with one scale per 128 inputs.

- `expand_lowbit`: codes (* group scales) -> a dense matrix in a reused scratch, for cuBLAS (bf16, or the codes
  alone in e4m3 for cuBLAS's block-scaled fp8 GEMM).
  At diffusion token counts (M = 1k-5k) the GEMM is compute-bound on Hopper, so a dense tensor-core GEMM
  usually beats in-loop unpacking; the expansion is a pure bandwidth pass.
- `lowbit_gemm`: one GEMM that reads the packed codes and applies the group scales in the K loop; bf16/fp16
  activations, or fp8 e4m3 activations with one scale per token and 128-group.
- `quantize_fp8`: activations -> fp8 e4m3 + fp32 scale per (token, 128-group), the scales token-major as cuBLAS
  reads them.

All of them also run under TRITON_INTERPRET=1 on CPU, which is how CI checks them.
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
    def expand(packed_ptr, scales_ptr, zeros_ptr, out_ptr, N, K,
               BITS: tl.constexpr, GROUP: tl.constexpr, TERNARY: tl.constexpr, SCALED: tl.constexpr,
               AFFINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        if AFFINE:
            t = q
        elif TERNARY:
            t = q - 1
        else:
            t = 2 * q - 1
        w = tl.reshape(t.to(tl.float32), (BLOCK_N, BLOCK_K))
        if SCALED:
            gcols = tl.program_id(1) * G + tl.arange(0, G)
            s = tl.load(scales_ptr + rows64 * (K // GROUP) + gcols[None, :], mask=rmask, other=0.0)  # [BLOCK_N, G]
            w = tl.reshape(w, (BLOCK_N, G, GROUP))
            if AFFINE:  # (q - zero) * scale in fp32, one rounding: HQQ's own dequantize
                z = tl.load(zeros_ptr + rows64 * (K // GROUP) + gcols[None, :], mask=rmask, other=0.0)
                w = w - z.to(tl.float32)[:, :, None]
            # t is -1/0/+1, so t * s in fp32 then one rounding equals t * round(s): same as the torch reference.
            w = tl.reshape(w * s.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K))
        cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rows64 * K + cols[None, :], w.to(out_ptr.dtype.element_ty), mask=rmask)

    return expand


def expand_lowbit(packed: torch.Tensor, scales: torch.Tensor | None, bits: int, group_size: int, in_features: int,
                  out: torch.Tensor, zeros: torch.Tensor | None = None, config: tuple[int, int, int] | None = None
                  ) -> torch.Tensor:
    """Write W = t * s into `out` [N, K] (any float dtype, contiguous), or the codes t alone if scales is None
    (what the fp8 GEMM reads: t is exact in e4m3). bits 4 with `zeros`: W = (q - zero) * s (HQQ 4-bit).
    config: (BLOCK_N, BLOCK_K, num_warps), for benchmarks/expand_study.py's sweep; None picks the default.

    packed: uint8 [N, K * bits / 8], LSB-first along K (bits 2: q = t + 1; bits 1: q = (b + 1) / 2).
    scales, zeros: float [N, K // group_size].
    """
    if bits not in (1, 2, 4) or (bits == 4) != (zeros is not None) or (zeros is not None and scales is None):
        raise ValueError(f"bits must be 1 (binary), 2 (ternary) or 4 with zeros and scales, got {bits}")
    n, k = packed.shape[0], in_features
    if packed.shape != (n, k * bits // 8) or packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8 [{n}, {k * bits // 8}], got {packed.dtype} {tuple(packed.shape)}")
    if k % group_size or any(t is not None and t.shape != (n, k // group_size) for t in (scales, zeros)):
        raise ValueError(f"scales and zeros must be [{n}, {k // group_size}] for in_features={k}")
    if out.shape != (n, k) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{n}, {k}] tensor, got {tuple(out.shape)}")
    if group_size & (group_size - 1) or group_size < 8:
        raise ValueError(f"group_size must be a power of two >= 8, got {group_size}")
    if config is None:  # 16 rows x 512 inputs, 4 warps: at HBM's write speed on the H200 (expand_study.py --sweep)
        block_k = next((b for b in (512, 256, 128) if b % group_size == 0 and k % b == 0), group_size)
        config = (16, block_k, 4)
    block_n, block_k, warps = config
    if k % block_k or block_k % group_size:
        raise ValueError(f"BLOCK_K {block_k} must be a multiple of group_size {group_size} that divides K {k}")
    grid = ((n + block_n - 1) // block_n, k // block_k)
    _expand_kernel()[grid](packed.contiguous(), packed if scales is None else scales.contiguous(),
                           packed if zeros is None else zeros.contiguous(), out, n, k,
                           BITS=bits, GROUP=group_size, TERNARY=bits == 2, SCALED=scales is not None,
                           AFFINE=zeros is not None,
                           BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps)
    return out


@functools.cache
def _gemm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(a_ptr, a_scales_ptr, b_ptr, b_scales_ptr, c_ptr, M, N, K, stride_am, stride_cm,
             BITS: tl.constexpr, GROUP: tl.constexpr, TERNARY: tl.constexpr, A_FP8: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # C [M, N] = A [M, K] @ (t * s).T, B the packed codes uint8 [N, K * BITS / 8]; BLOCK_K divides GROUP, so
        # one scale per row of B (and of fp8 A: token-major [K / GROUP, M]) covers a whole K step.
        pid = tl.program_id(0)
        grid_m = tl.cdiv(M, BLOCK_M)
        grid_n = tl.cdiv(N, BLOCK_N)
        # Grouped launch order: GROUP_M row blocks share each B tile while it is in L2.
        width = GROUP_M * grid_n
        first_m = (pid // width) * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mmask = rm < M
        nmask = rn < N
        rm64 = rm.to(tl.int64)
        rn64 = rn.to(tl.int64)
        rk = tl.arange(0, BLOCK_K)
        PER: tl.constexpr = 8 // BITS
        BLOCK_B: tl.constexpr = BLOCK_K // PER
        shifts = tl.arange(0, PER) * BITS
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            a = tl.load(a_ptr + rm64[:, None] * stride_am + (k0 + rk)[None, :], mask=mmask[:, None], other=0.0)
            kb = k0 // PER + tl.arange(0, BLOCK_B)
            byte = tl.load(b_ptr + rn64[None, :] * (K // PER) + kb[:, None], mask=nmask[None, :], other=0)
            q = (byte.to(tl.int32)[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1)  # [BLOCK_B, PER, N]
            q = tl.reshape(q, (BLOCK_K, BLOCK_N))  # row kb * PER + p: the LSB-first order along K
            if TERNARY:
                t = (q - 1).to(tl.float32)
            else:
                t = (2 * q - 1).to(tl.float32)
            s = tl.load(b_scales_ptr + rn64 * (K // GROUP) + k0 // GROUP, mask=nmask, other=0.0)  # [BLOCK_N]
            if A_FP8:
                sa = tl.load(a_scales_ptr + (k0 // GROUP) * M + rm64, mask=mmask, other=0.0)  # [BLOCK_M]
                acc += tl.dot(a, t.to(a.dtype)) * (sa[:, None] * s[None, :])
            else:
                # t * s rounded once: the same B as the dequantized weight, so acc sees exact weights.
                acc = tl.dot(a, (t * s[None, :]).to(a.dtype), acc)
        c = acc.to(c_ptr.dtype.element_ty)
        tl.store(c_ptr + rm64[:, None] * stride_cm + rn[None, :], c, mask=mmask[:, None] & nmask[None, :])

    return gemm


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried per shape by bonsai.backends.cuda.linear.
GEMM_CONFIGS = (
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (128, 128, 128, 8, 3),
    (64, 128, 128, 4, 4),
    (16, 128, 128, 4, 4),
)


def lowbit_gemm(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                in_features: int, x_scales: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                config=GEMM_CONFIGS[0]) -> torch.Tensor:
    """x [M, K] @ (t * s).T -> [M, N] in one kernel.

    b: the packed codes uint8 [N, K * bits / 8], unpacked in the K loop. x: bf16/fp16, or fp8 e4m3 with
    `x_scales` fp32 [M, K / group_size] token-major, strides (1, M), as `quantize_fp8` returns them; then the
    output is `out_dtype`.
    """
    import triton

    m, k = x.shape
    n = b.shape[0]
    block_m, block_n, block_k, warps, stages = config
    if k != in_features or group_size % block_k or b.dtype != torch.uint8 or b.shape[1] != k * bits // 8:
        raise ValueError(f"lowbit_gemm: x {tuple(x.shape)}, b {b.dtype} {tuple(b.shape)} and in_features={in_features} "
                         f"(bits {bits}, group {group_size}, BLOCK_K {block_k}) disagree")
    fp8 = x.dtype == torch.float8_e4m3fn
    if fp8 != (x_scales is not None):
        raise ValueError("lowbit_gemm: fp8 activations need x_scales, and only they")
    if fp8 and (x_scales.shape != (m, k // group_size) or x_scales.stride(0) != 1):
        raise ValueError(f"lowbit_gemm: x_scales must be [{m}, {k // group_size}] token-major (quantize_fp8), got "
                         f"{tuple(x_scales.shape)} strides {x_scales.stride()}")
    out = torch.empty(m, n, device=x.device, dtype=out_dtype or x.dtype)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _gemm_kernel()[grid](x, x if x_scales is None else x_scales, b, scales, out, m, n, k, x.stride(0), out.stride(0),
                         BITS=bits, GROUP=group_size, TERNARY=bits == 2, A_FP8=fp8,
                         BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=8,
                         num_warps=warps, num_stages=stages)
    return out


@functools.cache
def _quantize_fp8_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quantize(x_ptr, q_ptr, s_ptr, M, K, stride_xm, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        mask = (rm < M)[:, None]
        rm64 = rm.to(tl.int64)
        cols = tl.program_id(1) * GROUP + tl.arange(0, GROUP)
        x = tl.load(x_ptr + rm64[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        # 448 is the largest finite e4m3fn value; an all-zero group keeps scale 1 (its codes are 0 anyway).
        amax = tl.max(tl.abs(x), axis=1)
        s = tl.where(amax > 0, amax / 448.0, 1.0)
        q = x / s[:, None]
        tl.store(q_ptr + rm64[:, None] * K + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + tl.program_id(1) * M + rm64, s, mask=rm < M)

    return quantize


def quantize_fp8(x: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 e4m3 [M, K], fp32 scales [M, K / group_size]) with x ~= q * s per (token, group).
    The scales are token-major (strides (1, M)): the layout cuBLAS's 1x128 block scaling reads."""
    m, k = x.shape
    if k % group_size or x.stride(1) != 1:
        raise ValueError(f"quantize_fp8: x {tuple(x.shape)} needs K a multiple of {group_size} and unit stride")
    q = torch.empty(m, k, device=x.device, dtype=torch.float8_e4m3fn)
    s = torch.empty(k // group_size, m, device=x.device, dtype=torch.float32).t()  # [M, K / group], strides (1, M)
    block_m = 16
    _quantize_fp8_kernel()[((m + block_m - 1) // block_m, k // group_size)](
        x, q, s, m, k, x.stride(0), GROUP=group_size, BLOCK_M=block_m, num_warps=4)
    return q, s
