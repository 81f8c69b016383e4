"""Triton kernels for the elementwise steps that torch runs as several full-size passes, each rounding where the
torch code it replaces rounds.

- `group_norm_silu`: the VAE's GroupNorm (float32 statistics, one rounding) with the SiLU that follows it, in a
  statistics pass and one normalizing pass over NCHW or channels_last tensors.
- `rms_norm_rope`: the attention's QK RMSNorm and the RoPE pair rotation in one pass, written straight into the
  [B, H, N, d] tensor SDPA reads (the double-stream block's text and image parts into their rows, no `cat`).
- `join_swiglu`: the single block's [attention | SiLU(gate) * value] in one pass.
- `modulate`: LayerNorm + (1 + scale) * x + shift in one pass.

All run under TRITON_INTERPRET=1 on CPU, which is how CI checks them against the torch code they replace.
"""

from __future__ import annotations

import functools

import torch

TILE = 4096  # elements per program of the group-norm passes


@functools.cache
def _group_norm_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def stats(x_ptr, mean_ptr, m2_ptr, HW, G, n_chunks, s_b, s_c, s_hw,
              CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr):
        # One chunk of one (sample, group): its mean and centred sum of squares (combined with Chan's formula
        # below), so no cancellation from sum(x^2) - sum(x)^2 over millions of elements.
        bg, chunk = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        ch = g * CG + tl.arange(0, BLOCK_C)
        hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cmask = tl.arange(0, BLOCK_C) < CG
        mask = cmask[:, None] & (hw < HW)[None, :]
        offs = b.to(tl.int64) * s_b + ch.to(tl.int64)[:, None] * s_c + hw.to(tl.int64)[None, :] * s_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n = tl.sum(mask.to(tl.float32))
        mean = tl.sum(x) / n
        d = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + bg * n_chunks + chunk, mean)
        tl.store(m2_ptr + bg * n_chunks + chunk, tl.sum(d * d))

    @triton.jit
    def combine(mean_ptr, m2_ptr, out_ptr, n_chunks, HW, eps, CG: tl.constexpr, BLOCK_HW: tl.constexpr,
                BLOCK: tl.constexpr):
        bg = tl.program_id(0)
        total = (CG * HW).to(tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_chunks, BLOCK):
            i = start + tl.arange(0, BLOCK)
            n_i = (CG * tl.minimum(HW - i * BLOCK_HW, BLOCK_HW)).to(tl.float32)
            acc += tl.where(i < n_chunks, n_i * tl.load(mean_ptr + bg * n_chunks + i, mask=i < n_chunks, other=0.0), 0.0)
        mean = tl.sum(acc) / total
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n_chunks, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < n_chunks
            n_i = (CG * tl.minimum(HW - i * BLOCK_HW, BLOCK_HW)).to(tl.float32)
            d = tl.load(mean_ptr + bg * n_chunks + i, mask=ok, other=0.0) - mean
            acc += tl.where(ok, tl.load(m2_ptr + bg * n_chunks + i, mask=ok, other=0.0) + n_i * d * d, 0.0)
        tl.store(out_ptr + 2 * bg, mean)
        tl.store(out_ptr + 2 * bg + 1, 1.0 / tl.sqrt(tl.sum(acc) / total + eps))

    @triton.jit
    def normalize(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, HW, G, s_b, s_c, s_hw,
                  CG: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, SILU: tl.constexpr):
        bg, chunk = tl.program_id(0), tl.program_id(1)
        b, g = bg // G, bg % G
        ch = g * CG + tl.arange(0, BLOCK_C)
        hw = chunk * BLOCK_HW + tl.arange(0, BLOCK_HW)
        cmask = tl.arange(0, BLOCK_C) < CG
        mask = cmask[:, None] & (hw < HW)[None, :]
        offs = b.to(tl.int64) * s_b + ch.to(tl.int64)[:, None] * s_c + hw.to(tl.int64)[None, :] * s_hw
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean, rstd = tl.load(stats_ptr + 2 * bg), tl.load(stats_ptr + 2 * bg + 1)
        w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[:, None]
        bias = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[:, None]
        y = (x - mean) * rstd * w + bias
        if SILU:  # the unfused code rounds the norm's output before its SiLU
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return stats, combine, normalize


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    silu: bool) -> torch.Tensor:
    """GroupNorm of x [B, C, H, W] (NCHW or channels_last, 16-bit) with float32 statistics and affine, rounded
    once (then SiLU'd and rounded again if `silu`, as `F.silu(GroupNorm(x))`); the output keeps x's layout."""
    import triton

    b, c, h, w = x.shape
    hw = h * w
    if c % groups:
        raise ValueError(f"group_norm_silu needs channels divisible by groups, got {c} and {groups}")
    if x.stride(2) != w * x.stride(3):  # H, W must flatten to one strided axis
        x = x.contiguous()
    s_b, s_c, _, s_w = x.stride()
    cg = c // groups
    block_c = triton.next_power_of_2(cg)
    block_hw = min(max(16, TILE // block_c), triton.next_power_of_2(hw))
    n_chunks = triton.cdiv(hw, block_hw)
    stats, combine, normalize = _group_norm_kernels()
    means = torch.empty(b * groups, n_chunks, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    mean_rstd = torch.empty(b * groups, 2, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    grid = (b * groups, n_chunks)
    stats[grid](x, means, m2s, hw, groups, n_chunks, s_b, s_c, s_w, CG=cg, BLOCK_C=block_c, BLOCK_HW=block_hw)
    combine[(b * groups,)](means, m2s, mean_rstd, n_chunks, hw, eps, CG=cg, BLOCK_HW=block_hw,
                           BLOCK=min(1024, triton.next_power_of_2(n_chunks)))
    normalize[grid](x, y, mean_rstd, weight, bias, hw, groups, s_b, s_c, s_w, CG=cg, BLOCK_C=block_c,
                    BLOCK_HW=block_hw, SILU=silu)
    return y


@functools.cache
def _rms_norm_rope_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm_rope(x_ptr, w_ptr, cs_ptr, out_ptr, N, H, row0, eps, sx_b, sx_n, sx_h, so_b, so_h, so_n,
                      D: tl.constexpr, BLOCK_N: tl.constexpr):
        # One head of BLOCK_N tokens: [BLOCK_N, D] rows read once, normed, rotated in pairs (2j, 2j+1), stored.
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        bi, hi = bh // H, bh % H
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        d = tl.arange(0, D)
        mask = (n < N)[:, None]
        n64 = n.to(tl.int64)[:, None]
        x = tl.load(x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + n64 * sx_n + d[None, :], mask=mask,
                    other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + d).to(tl.float32)
        # The norm's output is rounded to the model dtype once, as F.rms_norm's is, before the fp32 rotation.
        y = (x * rstd[:, None] * w[None, :]).to(out_ptr.dtype.element_ty).to(tl.float32)
        # cs: the rope table as float32 [N_total, D/2, 2] = (cos, sin) pairs, rows from row0.
        cs = tl.load(cs_ptr + (row0 + n64) * D + d[None, :], mask=mask, other=0.0)
        y0, y1 = tl.split(tl.reshape(y, (BLOCK_N, D // 2, 2)))
        cos, sin = tl.split(tl.reshape(cs, (BLOCK_N, D // 2, 2)))
        out = tl.reshape(tl.join(y0 * cos - y1 * sin, y1 * cos + y0 * sin), (BLOCK_N, D))
        tl.store(out_ptr + bi.to(tl.int64) * so_b + hi * so_h + (row0 + n64) * so_n + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mask)

    return rms_norm_rope


def rms_norm_rope(parts, eps: float, freqs: torch.Tensor) -> torch.Tensor:
    """parts: (x [B, N_i, H, d] with unit stride in d, RMSNorm weight [d]) in sequence order; freqs complex64
    [sum N_i, d/2]. Returns F.rms_norm(x_i) rotated by RoPE, as [B, H, sum N_i, d] in x's dtype."""
    b, _, h, d = parts[0][0].shape
    n_total = sum(x.shape[1] for x, _ in parts)
    if freqs.shape != (n_total, d // 2) or freqs.dtype != torch.complex64:
        raise ValueError(f"rope table must be complex64 [{n_total}, {d // 2}], got {freqs.dtype} {tuple(freqs.shape)}")
    cs = torch.view_as_real(freqs)  # [N, d/2, 2] float32 (cos, sin), contiguous
    out = torch.empty(b, h, n_total, d, device=parts[0][0].device, dtype=parts[0][0].dtype)
    kernel, block_n, row0 = _rms_norm_rope_kernel(), 32, 0
    for x, weight in parts:
        n = x.shape[1]
        if x.stride(-1) != 1 or x.shape[0] != b or x.shape[2:] != (h, d):
            raise ValueError(f"rms_norm_rope parts must be [{b}, N, {h}, {d}] with unit stride in d")
        kernel[(-(-n // block_n), b * h)](x, weight, cs, out, n, h, row0, eps, x.stride(0), x.stride(1),
                                          x.stride(2), out.stride(0), out.stride(1), out.stride(2), D=d,
                                          BLOCK_N=block_n)
        row0 += n
    return out


@functools.cache
def _join_swiglu_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def join_swiglu(a_ptr, m_ptr, out_ptr, M, A, F, sa, sm, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        # Columns [0, A) copy the attention output, [A, A + F) are SiLU(gate) * value of the MLP half.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows64 = rows.to(tl.int64)[:, None]
        inside = (rows < M)[:, None] & (cols < A + F)[None, :]
        attn = (cols < A)[None, :]
        a = tl.load(a_ptr + rows64 * sa + cols[None, :], mask=inside & attn, other=0.0)
        j = (cols - A)[None, :]
        gate = tl.load(m_ptr + rows64 * sm + j, mask=inside & ~attn, other=0.0).to(tl.float32)
        value = tl.load(m_ptr + rows64 * sm + F + j, mask=inside & ~attn, other=0.0).to(tl.float32)
        # F.silu(gate) * value rounds SiLU's output to the model dtype before the product.
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)
        y = tl.where(attn, a.to(tl.float32), silu * value)
        tl.store(out_ptr + rows64 * (A + F) + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=inside)

    return join_swiglu


def join_swiglu(attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """`torch.cat([attn, swiglu(mlp)], -1)` in one pass: attn [B, N, A], mlp [B, N, 2F] (gate first), each with
    unit stride in the last dim and rows evenly strided (a view into the fused projection is fine)."""
    b, n, a = attn.shape
    f = mlp.shape[-1] // 2
    flat = lambda t: t.stride(-1) == 1 and (b == 1 or t.stride(0) == n * t.stride(1))  # noqa: E731
    if mlp.shape[:2] != (b, n) or not (flat(attn) and flat(mlp)):
        raise ValueError(f"join_swiglu needs [B, N, *] inputs with evenly strided rows, got {tuple(attn.shape)} "
                         f"{attn.stride()} and {tuple(mlp.shape)} {mlp.stride()}")
    out = torch.empty(b, n, a + f, device=attn.device, dtype=attn.dtype)
    block_m, block_c = 16, 256
    _join_swiglu_kernel()[(-(-b * n // block_m), -(-(a + f) // block_c))](
        attn, mlp, out, b * n, a, f, attn.stride(1), mlp.stride(1), BLOCK_M=block_m, BLOCK_C=block_c)
    return out


@functools.cache
def _modulate_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def modulate(x_ptr, shift_ptr, scale_ptr, out_ptr, M, N, D, eps, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        # BLOCK_M whole rows of D: LayerNorm statistics in fp32, then the per-sample affine.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        cmask = (cols < D)[None, :]
        mask = (rows < M)[:, None] & cmask
        rows64 = rows.to(tl.int64)[:, None]
        x = tl.load(x_ptr + rows64 * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(cmask, x - mean[:, None], 0.0)
        ln = xc / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)[:, None]
        dt = out_ptr.dtype.element_ty
        # As modulate's torch ops round: layer_norm's output and 1 + scale in the model dtype, then one addcmul.
        ln = ln.to(dt).to(tl.float32)
        sample = (rows // N).to(tl.int64)[:, None]
        shift = tl.load(shift_ptr + sample * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + sample * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        scale1 = (1.0 + scale).to(dt).to(tl.float32)
        tl.store(out_ptr + rows64 * D + cols[None, :], (shift + ln * scale1).to(dt), mask=mask)

    return modulate


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm of x [B, N, D], then (1 + scale) * . + shift with shift, scale [B, 1, D] (views into
    the modulation vector are fine): the torch `modulate` in one pass."""
    import triton

    b, n, d = x.shape
    if shift.shape != (b, 1, d) or scale.shape != (b, 1, d):
        raise ValueError(f"modulate needs shift and scale [{b}, 1, {d}], got {tuple(shift.shape)} {tuple(scale.shape)}")
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    out = torch.empty_like(x)
    block_d = triton.next_power_of_2(d)
    block_m = max(1, 4096 // block_d)
    _modulate_kernel()[(triton.cdiv(b * n, block_m),)](x, shift, scale, out, b * n, n, d, eps, BLOCK_M=block_m,
                                                        BLOCK_D=block_d)
    return out
