"""Triton kernels for the elementwise steps that torch runs as several full-size passes, each rounding where the
torch code it replaces rounds.

- `group_norm_silu`: the VAE's GroupNorm (float32 statistics, one rounding) with the SiLU that follows it, in a
  statistics pass and one normalizing pass over NCHW or channels_last tensors; `conv_group_norm_silu` adds the
  conv's bias before it inside those passes.
- `conv_bias_add`: a channels_last conv's bias and the residual add after it in one pass (torch adds the bias of
  a cuDNN conv as a separate, broadcasting op); `upsample_nearest`: the VAE's 2x nearest upsampling.
- `attention`: the VAE's single-head attention (head dim 512, past what FlashAttention and cuDNN take) as cuBLAS
  GEMMs over query chunks around `softmax_rows`, a fp32-scores-to-bf16-probabilities softmax in one pass.
- `rms_norm_rope`: the attention's QK RMSNorm and the RoPE pair rotation in one pass, written straight into the
  tensor SDPA reads (the double-stream block's text and image parts into their rows, no `cat`).
- `join_swiglu`: the single block's [attention | SiLU(gate) * value] in one pass; `swiglu` the same kernel for the
  double block's feed-forward (no attention part).
- `gated_add`: the gated residual x + gate * y (and the fp16 clip) in one vectorized pass.
- `modulate`: LayerNorm + (1 + scale) * x + shift in one pass.
- The text encoder's steps (`TextOps`): `rms_norm`, `add_rms_norm` (the residual add and the norm after it),
  `text_norm_rope` (QK RMSNorm + rotate_half RoPE + the grouped-query head repeat, in SDPA's layout) and
  `silu_mul`, one pass each.

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

    # Only sizes that address memory are specialized on (their divisibility lets loads vectorize): one compiled
    # variant serves every layer of a render (the cold start compiles each variant).
    @triton.jit(do_not_specialize=["n_chunks"])
    def stats(x_ptr, mean_ptr, m2_ptr, L, n_chunks, BLOCK: tl.constexpr):
        # One chunk of the contiguous span of L = C/G * H * W elements of one (sample, group): its mean and centred
        # sum of squares (combined with Chan's formula below), so no cancellation from sum(x^2) - sum(x)^2.
        bg, chunk = tl.program_id(0), tl.program_id(1)
        i = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = i < L
        x = tl.load(x_ptr + bg.to(tl.int64) * L + i, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x) / tl.minimum(L - chunk * BLOCK, BLOCK).to(tl.float32)
        d = tl.where(mask, x - mean, 0.0)
        tl.store(mean_ptr + bg * n_chunks + chunk, mean)
        tl.store(m2_ptr + bg * n_chunks + chunk, tl.sum(d * d))

    @triton.jit(do_not_specialize=["n", "L", "period"])
    def combine(mean_ptr, m2_ptr, out_ptr, n, L, period, eps, BLOCK_L: tl.constexpr, BLOCK: tl.constexpr):
        # The n entries of one (sample, group), contiguous; entry i covers min(L - (i % period) * BLOCK_L, BLOCK_L)
        # elements (spans of L elements cut in chunks of BLOCK_L), n / period * L in all.
        bg = tl.program_id(0)
        base = bg.to(tl.int64) * n
        total = (n // period * L).to(tl.float32)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < n
            n_i = tl.minimum(L - (i % period) * BLOCK_L, BLOCK_L).to(tl.float32)
            acc += tl.where(ok, n_i * tl.load(mean_ptr + base + i, mask=ok, other=0.0), 0.0)
        mean = tl.sum(acc) / total
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            i = start + tl.arange(0, BLOCK)
            ok = i < n
            n_i = tl.minimum(L - (i % period) * BLOCK_L, BLOCK_L).to(tl.float32)
            d = tl.load(mean_ptr + base + i, mask=ok, other=0.0) - mean
            acc += tl.where(ok, tl.load(m2_ptr + base + i, mask=ok, other=0.0) + n_i * d * d, 0.0)
        tl.store(out_ptr + 2 * bg, mean)
        tl.store(out_ptr + 2 * bg + 1, 1.0 / tl.sqrt(tl.sum(acc) / total + eps))

    @triton.jit(do_not_specialize=["C", "G", "CG"])
    def normalize(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, HW, C, G, CG, BLOCK: tl.constexpr, SILU: tl.constexpr):
        # One chunk of one (sample, channel) plane: scalar statistics, weight and bias.
        bc, chunk = tl.program_id(0), tl.program_id(1)
        ch = bc % C
        bg = (bc // C) * G + ch // CG
        i = chunk * BLOCK + tl.arange(0, BLOCK)
        mask = i < HW
        offs = bc.to(tl.int64) * HW + i
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean, rstd = tl.load(stats_ptr + 2 * bg), tl.load(stats_ptr + 2 * bg + 1)
        y = (x - mean) * rstd * tl.load(w_ptr + ch).to(tl.float32) + tl.load(b_ptr + ch).to(tl.float32)
        if SILU:  # the unfused code rounds the norm's output before its SiLU
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit(do_not_specialize=["n_chunks"])
    def stats_cl(x_ptr, pre_ptr, mean_ptr, m2_ptr, HW, C, n_chunks, PIX: tl.constexpr, BLOCK_P: tl.constexpr,
                 BLOCK_C: tl.constexpr, PRE: tl.constexpr):
        # channels_last [B, HW, C]: PIX pixels x BLOCK_C channels -> per channel, the mean and centred sum of
        # squares of its PIX pixels; `combine` merges a group's entries. Sums of x - k, k the chunk's first pixel:
        # a value of the data keeps the sums small (no cancellation), and the [BLOCK_P, BLOCK_C] accumulators are
        # reduced once, after the loop. PRE: x is a conv output whose bias is added here, rounded as torch's
        # separate bias add rounds it.
        bi, cb, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = ch < C
        row0 = bi.to(tl.int64) * HW + chunk * PIX
        k = tl.load(x_ptr + row0 * C + ch, mask=cmask, other=0.0).to(tl.float32)
        if PRE:
            pre = tl.load(pre_ptr + ch, mask=cmask, other=0.0).to(tl.float32)
            k = (k + pre).to(x_ptr.dtype.element_ty).to(tl.float32)
        s1 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        s2 = tl.zeros([BLOCK_P, BLOCK_C], tl.float32)
        for t in range(0, PIX, BLOCK_P):
            p = t + tl.arange(0, BLOCK_P)
            mask = (chunk * PIX + p < HW)[:, None] & cmask[None, :]
            x = tl.load(x_ptr + (row0 + p)[:, None] * C + ch[None, :], mask=mask, other=0.0).to(tl.float32)
            if PRE:
                x = (x + pre[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            d = tl.where(mask, x - k[None, :], 0.0)
            s1 += d
            s2 += d * d
        n = tl.minimum(HW - chunk * PIX, PIX).to(tl.float32)
        t1 = tl.sum(s1, axis=0)
        # entry layout [B, C, n_chunks]: a group's entries are one contiguous run of C/G * n_chunks
        out = (bi * C + ch).to(tl.int64) * n_chunks + chunk
        tl.store(mean_ptr + out, k + t1 / n, mask=cmask)
        tl.store(m2_ptr + out, tl.maximum(tl.sum(s2, axis=0) - t1 * t1 / n, 0.0), mask=cmask)

    @triton.jit(do_not_specialize=["G", "CG"])
    def normalize_cl(x_ptr, pre_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, HW, C, G, CG, BLOCK_P: tl.constexpr,
                     BLOCK_C: tl.constexpr, SILU: tl.constexpr, PRE: tl.constexpr):
        bi, cb, chunk = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        p = chunk * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
        cmask = ch < C
        mask = (p < HW)[:, None] & cmask[None, :]
        offs = (bi.to(tl.int64) * HW + p.to(tl.int64))[:, None] * C + ch[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if PRE:
            pre = tl.load(pre_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
            x = (x + pre).to(x_ptr.dtype.element_ty).to(tl.float32)
        bg = bi * G + ch // CG
        mean = tl.load(stats_ptr + 2 * bg, mask=cmask, other=0.0)[None, :]
        rstd = tl.load(stats_ptr + 2 * bg + 1, mask=cmask, other=0.0)[None, :]
        w = tl.load(w_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        bias = tl.load(b_ptr + ch, mask=cmask, other=0.0).to(tl.float32)[None, :]
        y = (x - mean) * rstd * w + bias
        if SILU:
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)

    return stats, combine, normalize, stats_cl, normalize_cl


def channels_last(x: torch.Tensor) -> bool:
    return not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def group_norm_silu(x: torch.Tensor, groups: int, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                    silu: bool, pre_bias: torch.Tensor | None = None) -> torch.Tensor:
    """GroupNorm of x [B, C, H, W] (16-bit, NCHW or channels_last) with float32 statistics and affine, rounded
    once (then SiLU'd and rounded again if `silu`, as `F.silu(GroupNorm(x))`); the output keeps x's layout.
    pre_bias [C]: x is a conv's output without its bias; GroupNorm(x + pre_bias), the sum rounded as torch's
    conv rounds it (channels_last: inside both passes)."""
    b, c, h, w = x.shape
    if c % groups:
        raise ValueError(f"group_norm_silu needs channels divisible by groups, got {c} and {groups}")
    cl = channels_last(x)
    if pre_bias is not None and not cl:
        x, pre_bias = x + pre_bias.view(1, c, 1, 1), None
    x = x if cl else x.contiguous()
    hw, cg = h * w, c // groups
    stats, combine, normalize, stats_cl, normalize_cl = _group_norm_kernels()
    # Per (sample, group): n entries of (mean, centred sum of squares) over `per` elements each, the last ragged.
    if cl:
        block_p, block_c, pix = 32, 128, 512
        n_chunks = -(-hw // pix)
        n, per = cg * n_chunks, pix
    else:
        n_chunks = -(-cg * hw // TILE)
        n, per = n_chunks, TILE
    means = torch.empty(b * groups * n, device=x.device, dtype=torch.float32)
    m2s = torch.empty_like(means)
    mean_rstd = torch.empty(b * groups, 2, device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    if cl:
        pre = x if pre_bias is None else pre_bias
        grid = (b, -(-c // block_c), n_chunks)
        stats_cl[grid](x, pre, means, m2s, hw, c, n_chunks, PIX=pix, BLOCK_P=block_p, BLOCK_C=block_c,
                       PRE=pre_bias is not None)
        combine[(b * groups,)](means, m2s, mean_rstd, n, hw, n_chunks, eps, BLOCK_L=per, BLOCK=1024)
        normalize_cl[(b, -(-c // block_c), -(-hw // block_p))](x, pre, y, mean_rstd, weight, bias, hw, c, groups,
                                                               cg, BLOCK_P=block_p, BLOCK_C=block_c, SILU=silu,
                                                               PRE=pre_bias is not None)
    else:
        stats[(b * groups, n_chunks)](x, means, m2s, cg * hw, n_chunks, BLOCK=TILE)
        combine[(b * groups,)](means, m2s, mean_rstd, n, cg * hw, n_chunks, eps, BLOCK_L=per, BLOCK=1024)
        normalize[(b * c, -(-hw // TILE))](x, y, mean_rstd, weight, bias, hw, c, groups, cg, BLOCK=TILE, SILU=silu)
    return y


@functools.cache
def _conv_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def bias_add_cl(h_ptr, b_ptr, x_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
                    ADD: tl.constexpr):
        # channels_last [P pixels, C]: h + bias rounded (torch's conv adds its bias as a separate op), then
        # + x rounded (the residual), as the two torch adds round.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p < P)[:, None] & (ch < C)[None, :]
        offs = p.to(tl.int64)[:, None] * C + ch[None, :]
        dt = out_ptr.dtype.element_ty
        bias = tl.load(b_ptr + ch, mask=ch < C, other=0.0).to(tl.float32)[None, :]
        y = (tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32) + bias).to(dt)
        if ADD:
            y = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + y.to(tl.float32)).to(dt)
        tl.store(out_ptr + offs, y, mask=mask)

    @triton.jit
    def upsample_cl(x_ptr, out_ptr, P, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # channels_last [B, H, W, C] -> [B, 2H, 2W, C]: each input pixel's channels into its 2x2 output block.
        p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        ch = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (p < P)[:, None] & (ch < C)[None, :]
        p64 = p.to(tl.int64)
        v = tl.load(x_ptr + p64[:, None] * C + ch[None, :], mask=mask, other=0.0)
        row = p64 // W  # b * H + i
        o = (2 * row * (2 * W) + 2 * (p64 % W))[:, None] * C + ch[None, :]  # output pixel (b, 2i, 2j)
        for di in range(2):
            for dj in range(2):
                tl.store(out_ptr + o + (di * 2 * W + dj) * C, v, mask=mask)

    return bias_add_cl, upsample_cl


def _conv_no_bias(layer, x: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.conv2d(x, layer.weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)


def conv_bias_add(layer, h: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """`layer(h)` (+ x): a channels_last conv without its bias, then the bias (and the residual x) in one pass
    with the roundings of torch's separate adds; other layouts run the torch code."""
    if layer.bias is None:
        return layer(h) if x is None else x + layer(h)
    y = _conv_no_bias(layer, h)
    if not channels_last(y) or (x is not None and (x.shape != y.shape or x.stride() != y.stride())):
        y = y + layer.bias.view(1, -1, 1, 1)
        return y if x is None else x + y
    b, c, hh, ww = y.shape
    block_p, block_c = 32, min(128, 1 << (c - 1).bit_length())
    grid = (-(-b * hh * ww // block_p), -(-c // block_c))
    _conv_kernels()[0][grid](y, layer.bias, y if x is None else x, y, b * hh * ww, c, BLOCK_P=block_p,
                             BLOCK_C=block_c, ADD=x is not None)
    return y


def conv_group_norm_silu(layer, norm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """`group_norm_silu(layer(x))` with the conv's bias added inside the norm's passes."""
    if layer.bias is None:
        return group_norm_silu(layer(x), norm.num_groups, norm.weight, norm.bias, norm.eps, silu)
    return group_norm_silu(_conv_no_bias(layer, x), norm.num_groups, norm.weight, norm.bias, norm.eps, silu,
                           pre_bias=layer.bias)


def upsample_nearest(x: torch.Tensor) -> torch.Tensor:
    """2x nearest upsampling of a channels_last [B, C, H, W] (torch's own kernel for other layouts)."""
    if not channels_last(x):
        import torch.nn.functional as F

        return F.interpolate(x, scale_factor=2.0, mode="nearest")
    b, c, h, w = x.shape
    out = torch.empty(b, c, 2 * h, 2 * w, device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
    block_p, block_c = 32, min(128, 1 << (c - 1).bit_length())
    _conv_kernels()[1][(-(-b * h * w // block_p), -(-c // block_c))](x, out, b * h * w, h, w, c, BLOCK_P=block_p,
                                                                     BLOCK_C=block_c)
    return out


@functools.cache
def _softmax_kernel():
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["L"])
    def softmax_rows(s_ptr, out_ptr, L, scale, BLOCK: tl.constexpr):
        # One row of L fp32 scores: its max, its sum of exponentials, then the probabilities (the row is read
        # from HBM once; the later reads of its 4L bytes come from L2).
        row = tl.program_id(0).to(tl.int64) * L
        m = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, L, BLOCK):
            i = start + tl.arange(0, BLOCK)
            m = tl.maximum(m, tl.load(s_ptr + row + i, mask=i < L, other=float("-inf")) * scale)
        top = tl.max(m)
        acc = tl.zeros([BLOCK], tl.float32)
        for start in range(0, L, BLOCK):
            i = start + tl.arange(0, BLOCK)
            x = tl.load(s_ptr + row + i, mask=i < L, other=float("-inf")) * scale
            acc += tl.exp(x - top)
        inv = 1.0 / tl.sum(acc)
        for start in range(0, L, BLOCK):
            i = start + tl.arange(0, BLOCK)
            x = tl.load(s_ptr + row + i, mask=i < L, other=float("-inf")) * scale
            tl.store(out_ptr + row + i, (tl.exp(x - top) * inv).to(out_ptr.dtype.element_ty), mask=i < L)

    return softmax_rows


def softmax_rows(s: torch.Tensor, scale: float, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """softmax(s * scale) along the last dim of fp32 scores s [R, L] (contiguous), rounded once to `dtype`: the
    values of `torch.softmax(s * scale, -1).to(dtype)` up to fp32 summation order."""
    if s.ndim != 2 or s.dtype != torch.float32 or not s.is_contiguous():
        raise ValueError(f"softmax_rows needs contiguous fp32 [R, L] scores, got {s.dtype} {tuple(s.shape)}")
    out = torch.empty(s.shape, device=s.device, dtype=dtype)
    _softmax_kernel()[(s.shape[0],)](s, out, s.shape[1], scale, BLOCK=4096, num_warps=8)
    return out


ATTENTION_SCRATCH = 384 << 20  # bytes of one query chunk's fp32 scores and bf16 probabilities


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v)` for q, k, v [B, H, L, C] with unit stride in C: per head, fp32
    scores (cuBLAS, bf16 inputs), `softmax_rows` to bf16 probabilities, cuBLAS times v, in chunks of queries whose
    scores fit ATTENTION_SCRATCH (4096 queries at 16384 positions, the VAE's at 1024x1024)."""
    b, h, n, c = q.shape
    if k.shape != q.shape or v.shape != q.shape or q.device.type != "cuda":
        raise ValueError(f"attention needs CUDA q, k, v of one shape, got {tuple(q.shape)} {tuple(k.shape)} "
                         f"{tuple(v.shape)} on {q.device}")
    rows = max(1, 1 << (ATTENTION_SCRATCH // (6 * n)).bit_length() - 1)
    out = torch.empty(b, h, n, c, device=q.device, dtype=q.dtype)
    for i in range(b):
        for j in range(h):
            kt, vj = k[i, j].t(), v[i, j]  # [C, L], [L, C]
            for r0 in range(0, n, rows):
                scores = torch.mm(q[i, j, r0 : r0 + rows], kt, out_dtype=torch.float32)  # [rows, L]
                torch.mm(softmax_rows(scores, c**-0.5, q.dtype), vj, out=out[i, j, r0 : r0 + rows])
    return out


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
    [sum N_i, d/2]. Returns F.rms_norm(x_i) rotated by RoPE, as [B, H, sum N_i, d] in x's dtype (a transposed view
    of [B, sum N_i, H, d] memory)."""
    b, _, h, d = parts[0][0].shape
    n_total = sum(x.shape[1] for x, _ in parts)
    if freqs.shape != (n_total, d // 2) or freqs.dtype != torch.complex64:
        raise ValueError(f"rope table must be complex64 [{n_total}, {d // 2}], got {freqs.dtype} {tuple(freqs.shape)}")
    cs = torch.view_as_real(freqs)  # [N, d/2, 2] float32 (cos, sin), contiguous
    # [B, N, H, d] memory seen as [B, H, N, d]: SDPA (cuDNN) then writes its output in the [B, N, H*d] layout the
    # output projection reads, with no copy (0.60 -> 0.53 ms per attention at 5120 tokens: fp8_study.py)
    out = torch.empty(b, n_total, h, d, device=parts[0][0].device, dtype=parts[0][0].dtype).transpose(1, 2)
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
    return _join(attn, mlp, a)


def swiglu(mlp: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * value of mlp [B, N, 2F] (gate first, contiguous) in one pass."""
    if not mlp.is_contiguous():
        raise ValueError(f"swiglu needs a contiguous input, got {tuple(mlp.shape)} {mlp.stride()}")
    return _join(mlp, mlp, 0)  # no attention columns: the first input is never read


def _join(attn: torch.Tensor, mlp: torch.Tensor, a: int) -> torch.Tensor:
    b, n, two_f = mlp.shape
    f = two_f // 2
    out = torch.empty(b, n, a + f, device=mlp.device, dtype=mlp.dtype)
    block_m, block_c = 16, 256
    _join_swiglu_kernel()[(-(-b * n // block_m), -(-(a + f) // block_c))](
        attn, mlp, out, b * n, a, f, attn.stride(1), mlp.stride(1), BLOCK_M=block_m, BLOCK_C=block_c)
    return out


@functools.cache
def _gated_add_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def gated_add(x_ptr, g_ptr, y_ptr, out_ptr, M, N, D, s_g, CLIP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        sample = (rows // N).to(tl.int64)[:, None]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + sample * s_g + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        out = x + g * y  # addcmul's float arithmetic, one rounding
        if CLIP:
            out = tl.minimum(tl.maximum(out, -65504.0), 65504.0)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)

    return gated_add


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """x + gate * y for x, y [B, N, D] and gate [B, 1, D] (a view into the modulation vector is fine), as
    `torch.addcmul`; clip: then clipped to the fp16 range when x is fp16."""
    b, n, d = x.shape
    if y.shape != x.shape or gate.shape != (b, 1, d) or gate.stride(-1) != 1:
        raise ValueError(f"gated_add needs x, y [B, N, D] and gate [B, 1, D], got {tuple(x.shape)} "
                         f"{tuple(y.shape)} {tuple(gate.shape)}")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty_like(x)
    block_m, block_d = 8, 512
    _gated_add_kernel()[(-(-b * n // block_m), -(-d // block_d))](
        x, gate, y, out, b * n, n, d, gate.stride(0), CLIP=clip and x.dtype == torch.float16, BLOCK_M=block_m,
        BLOCK_D=block_d)
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


# --- the text encoder's (Qwen3) steps ---------------------------------------------------------------------------


@functools.cache
def _rms_norm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_norm(x_ptr, y_ptr, w_ptr, sum_ptr, out_ptr, M, D, eps, ADD: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
        # BLOCK_M whole rows of D; ADD: the rows are x + y, rounded (and stored) first, as the residual add is.
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_D)
        mask = (rows < M)[:, None] & (cols < D)[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dt = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if ADD:
            x = (x.to(tl.float32) + tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)).to(dt)
            tl.store(sum_ptr + offs, x, mask=mask)
        x = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        w = tl.load(w_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        # RMSNorm rounds the normed rows to the model dtype before the weight's product
        y = (x * rstd[:, None]).to(dt).to(tl.float32) * w[None, :]
        tl.store(out_ptr + offs, y.to(dt), mask=mask)

    return rms_norm


def _rms_norm(norm, x: torch.Tensor, y: torch.Tensor | None):
    import triton

    d = x.shape[-1]
    x = x.contiguous()
    out = torch.empty_like(x)
    total = torch.empty_like(x) if y is not None else out
    block_d = triton.next_power_of_2(d)
    block_m = max(1, 2048 // block_d)
    m = x.numel() // d
    _rms_norm_kernel()[(triton.cdiv(m, block_m),)](
        x, x if y is None else y.contiguous(), norm.weight, total, out, m, d, norm.eps, ADD=y is not None,
        BLOCK_M=block_m, BLOCK_D=block_d)
    return out if y is None else (total, out)


def rms_norm(norm, x: torch.Tensor) -> torch.Tensor:
    """The text encoder's `norm(x)` (RMSNorm over the last dim: float32 statistics, rounded, then the weight) in
    one pass."""
    return _rms_norm(norm, x, None)


def add_rms_norm(norm, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) in one pass: the residual add and the RMSNorm after it."""
    if y.shape != x.shape:
        raise ValueError(f"add_rms_norm needs x and y of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return _rms_norm(norm, x, y)


@functools.cache
def _text_norm_rope_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def norm_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, S, H, eps, sx_b, sx_s, sx_h, so_b, so_h, so_s,
                  N_REP: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr):
        # One head of BLOCK_S tokens, as its two halves (rotate_half pairs element j with j + D/2): normed,
        # rotated and stored once per repeated head.
        pid_s, bh = tl.program_id(0), tl.program_id(1)
        bi, hi = bh // H, bh % H
        s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
        d = tl.arange(0, D // 2)
        mask = (s < S)[:, None]
        s64 = s.to(tl.int64)[:, None]
        src = x_ptr + bi.to(tl.int64) * sx_b + hi * sx_h + s64 * sx_s + d[None, :]
        x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(src + D // 2, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
        dt = out_ptr.dtype.element_ty
        w1 = tl.load(w_ptr + d).to(tl.float32)[None, :]
        w2 = tl.load(w_ptr + D // 2 + d).to(tl.float32)[None, :]
        y1 = ((x1 * rstd[:, None]).to(dt).to(tl.float32) * w1).to(dt)
        y2 = ((x2 * rstd[:, None]).to(dt).to(tl.float32) * w2).to(dt)
        table = s64 * D + d[None, :]
        c1 = tl.load(cos_ptr + table, mask=mask, other=0.0)
        c2 = tl.load(cos_ptr + table + D // 2, mask=mask, other=0.0)
        s1 = tl.load(sin_ptr + table, mask=mask, other=0.0)
        s2 = tl.load(sin_ptr + table + D // 2, mask=mask, other=0.0)
        # y * cos + rotate_half(y) * sin in the model dtype: each product and the sum rounded, as the torch ops
        o1 = y1 * c1 - y2 * s1
        o2 = y2 * c2 + y1 * s2
        for r in tl.static_range(N_REP):
            dst = out_ptr + bi.to(tl.int64) * so_b + (hi * N_REP + r) * so_h + s64 * so_s + d[None, :]
            tl.store(dst, o1, mask=mask)
            tl.store(dst + D // 2, o2, mask=mask)

    return norm_rope


def text_norm_rope(norm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rep: int) -> torch.Tensor:
    """The text encoder's QK RMSNorm + rotate_half RoPE of x [B, S, H, d] (unit stride in d), each head repeated
    n_rep times, in one pass -> [B, H * n_rep, S, d] (a transposed view of [B, S, H * n_rep, d] memory, which
    SDPA reads as it is)."""
    b, s, h, d = x.shape
    if x.stride(-1) != 1 or cos.shape != (s, d) or sin.shape != (s, d):
        raise ValueError(f"text_norm_rope needs x [B, S, H, d] with unit stride in d and cos, sin [{s}, {d}], got "
                         f"{tuple(x.shape)} {x.stride()}, {tuple(cos.shape)}, {tuple(sin.shape)}")
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(b, s, h * n_rep, d, device=x.device, dtype=x.dtype).transpose(1, 2)
    block_s = 32
    # no FMA contraction: Triton computes the bf16 rotation in fp32 and would fuse y1 * c1 - y2 * s1 into one
    # rounding (0.23 of the values an ulp off torch's on the H200, against 6e-6 without)
    _text_norm_rope_kernel()[(-(-s // block_s), b * h)](
        x, norm.weight, cos, sin, out, s, h, norm.eps, x.stride(0), x.stride(1), x.stride(2), out.stride(0),
        out.stride(1), out.stride(2), N_REP=n_rep, D=d, BLOCK_S=block_s, enable_fp_fusion=False)
    return out


@functools.cache
def _silu_mul_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def silu_mul(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        g = tl.load(g_ptr + i, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + i, mask=mask, other=0.0).to(tl.float32)
        # F.silu(gate) * up rounds SiLU's output to the model dtype before the product
        silu = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + i, (silu * u).to(out_ptr.dtype.element_ty), mask=mask)

    return silu_mul


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up in one pass."""
    if gate.shape != up.shape:
        raise ValueError(f"silu_mul needs gate and up of one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    block = 2048
    _silu_mul_kernel()[(-(-gate.numel() // block),)](gate, up, out, gate.numel(), BLOCK=block)
    return out
