"""The fast path's Triton kernels, run by Triton's CPU interpreter: the expand equals the dequantized weight exactly,
the fused GEMM and the fp8 path equal matmuls built in the test."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

# Run in a child process: TRITON_INTERPRET must be set before triton is first imported.
SCRIPT = textwrap.dedent(
    """
    import numpy as np, torch
    from bonsai.backends.cuda.kernels import expand_lowbit
    from bonsai.quant import LowBitWeight

    def pack_np(q, bits):
        per = 8 // bits
        q = q.reshape(q.shape[0], -1, per).astype(np.uint8)
        out = np.zeros(q.shape[:2], np.uint8)
        for j in range(per):
            out |= q[:, :, j] << (j * bits)
        return out

    rng = np.random.default_rng(0)
    checked = 0
    for kind, bits in (("ternary", 2), ("binary", 1)):
        for n, k in ((8, 128), (24, 384), (5, 256)):
            t = rng.integers(-1, 2, (n, k)) if kind == "ternary" else rng.integers(0, 2, (n, k)) * 2 - 1
            s = (rng.random((n, k // 128)) * 2 - 1).astype(np.float32)
            q = t + 1 if kind == "ternary" else (t + 1) // 2
            packed = torch.from_numpy(pack_np(q, bits))
            for dt, npdt in ((torch.float32, np.float32), (torch.float16, np.float16)):
                out = torch.full((n, k), float("nan"), dtype=dt)
                expand_lowbit(packed, torch.from_numpy(s), bits, 128, k, out)
                # t is -1/0/+1: t * round(s) is exactly what any dequantizer must give.
                want = t.astype(npdt) * np.repeat(s.astype(npdt), 128, axis=1)
                assert np.array_equal(out.numpy(), want), (kind, n, k, dt)
                lw = LowBitWeight.from_codes(torch.from_numpy(t.astype(np.int8)), torch.from_numpy(s), kind)
                assert torch.equal(lw.packed, packed), (kind, n, k)
                assert torch.equal(out, lw.dequantize(dt)), (kind, n, k, dt)
                checked += 1
    # HQQ 4-bit (the text encoder): (q - zero) * scale with fp16 meta, group 64.
    from bonsai.quant.qwen4bit import Int4Weight
    for n, k in ((8, 128), (5, 320)):
        q = rng.integers(0, 16, (n, k))
        scale = torch.from_numpy(rng.random((n, k // 64)).astype(np.float16))
        zero = torch.from_numpy((rng.random((n, k // 64)) * 15).astype(np.float16))
        w4 = Int4Weight(torch.from_numpy(pack_np(q, 4)), scale, zero, 64)
        assert np.array_equal(w4.codes().numpy(), q)
        for dt in (torch.float32, torch.float16):
            out = torch.full((n, k), float("nan"), dtype=dt)
            expand_lowbit(w4.packed, scale, 4, 64, k, out, zeros=zero)
            assert torch.equal(out, w4.dequantize(dt)), (n, k, dt)
            checked += 1
    print("OK", checked)
    """
)


GEMM_SCRIPT = textwrap.dedent(
    """
    import torch
    from bonsai.backends.cuda.kernels import expand_lowbit, lowbit_gemm, quantize_fp8
    from bonsai.quant import LowBitWeight

    def rel(y, ref):
        return ((y.float() - ref).norm() / ref.norm()).item()

    torch.manual_seed(0)
    checked = 0
    for kind in ("ternary", "binary"):
        n, k, m = 40, 256, 19  # N and M not multiples of the tiles: the masks are exercised
        t = torch.randint(-1, 2, (n, k)) if kind == "ternary" else torch.randint(0, 2, (n, k)) * 2 - 1
        s = torch.rand(n, k // 128) + 0.5
        w = LowBitWeight.from_codes(t.to(torch.int8), s, kind)
        dense = t.float() * s.repeat_interleave(128, dim=1)  # [n, k] fp32, built here
        x = torch.randn(m, k)
        for config in ((16, 16, 64, 4, 1), (16, 32, 128, 4, 1)):
            for dt, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3)):
                y = lowbit_gemm(x.to(dt), w.packed, w.scales, w.bits, 128, k, config=config)
                assert y.dtype == dt and y.shape == (m, n)
                ref = x.to(dt).float() @ dense.to(dt).float().T
                assert rel(y, ref) < tol, (kind, config, dt, rel(y, ref))
                checked += 1
            q, xs = quantize_fp8(x)
            assert q.dtype == torch.float8_e4m3fn and xs.shape == (m, k // 128) and xs.stride() == (1, m)
            # Every group's largest magnitude maps to 448. The interpreter's fp32 -> e4m3 rounding is not the
            # hardware's (it can drop a carry into the exponent), so q's rounding is checked on the device.
            assert torch.allclose(xs, x.view(m, -1, 128).abs().amax(-1) / 448)
            xq = (q.float().view(m, -1, 128) * xs[..., None]).view(m, k)
            codes = torch.full((n, k), float("nan")).to(torch.float8_e4m3fn)  # what cuBLAS's fp8 GEMM reads
            expand_lowbit(w.packed, None, w.bits, 128, k, codes)
            assert torch.equal(codes.float(), t.float())
            y = lowbit_gemm(q, w.packed, w.scales, w.bits, 128, k, x_scales=xs, out_dtype=torch.float32,
                            config=config)
            assert rel(y, xq @ dense.T) < 1e-6, (kind, config)
            checked += 1
    print("OK", checked)
    """
)


# The layers as the runtime builds them (one Workspace and one GemmChoices shared by all); expected outputs are
# matmuls of weights built here. On the CPU nothing is measured: a layer runs
# the recorded choice or its default ("cublas": expand into the workspace, then F.linear).
LAYER_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from torch import nn
    from bonsai.backends.cuda.choice import GemmChoice, GemmChoices
    from bonsai.backends.cuda.linear import FastInt4Linear, FastLowBitLinear, Workspace, candidates
    from bonsai.quant import LowBitWeight
    from bonsai.quant.qwen4bit import Int4Weight

    FUSED = sys.argv[1] == "fused"  # the fused GEMM's K loop needs numpy < 2.3 in the interpreter

    def rel(y, ref):
        return ((y.float() - ref).norm() / ref.norm()).item()

    def weight(n, k, kind, seed):
        g = torch.Generator().manual_seed(seed)
        t = torch.randint(-1, 2, (n, k), generator=g) if kind == "ternary" else torch.randint(0, 2, (n, k), generator=g) * 2 - 1
        s = torch.rand(n, k // 128, generator=g) + 0.5
        return LowBitWeight.from_codes(t.to(torch.int8), s, kind), t.float() * s.repeat_interleave(128, dim=1)

    ws, table = Workspace("cpu"), GemmChoices()
    (w1, d1), (w2, d2) = weight(40, 256, "ternary", 0), weight(24, 384, "binary", 1)
    x1, x2 = torch.randn(2, 19, 256), torch.randn(19, 384)
    checked = 0
    for linear in ("expand", "auto", "fused") if FUSED else ("expand", "auto"):
        l1 = FastLowBitLinear(w1, device="cpu", linear=linear, workspace=ws, choices=table)
        l2 = FastLowBitLinear(w2, device="cpu", linear=linear, workspace=ws, choices=table)
        y1, y2 = l1(x1), l2(x2)
        assert y1.shape == (2, 19, 40) and y2.shape == (19, 24)
        assert rel(y1, x1 @ d1.T) < 1e-6 and rel(y2, x2 @ d2.T) < 1e-6, linear
        checked += 1
    assert ws.numel == 40 * 256 and [b.numel() for b in ws.buffers()] == [40 * 256]  # one buffer, largest layer
    assert len(table) == 0  # nothing was measured on the CPU

    # A double block's q, k, v as one GEMM over their weights side by side (M > 64, expand linears): each output a
    # column slice of one product. The fused linear, M <= 64 and layers of another kind run one by one.
    from bonsai.backends.torch.linear import project
    qkv = [weight(n, 256, "ternary", 10 + i) for i, n in enumerate((40, 40, 24))]
    xq = torch.randn(2, 45, 256)
    one_storage = lambda ys: len({y.untyped_storage().data_ptr() for y in ys}) == 1
    for linear in ("expand", "auto", "fused") if FUSED else ("expand", "auto"):
        layers = [FastLowBitLinear(w, device="cpu", linear=linear, workspace=ws, choices=table) for w, _ in qkv]
        for xin in (xq, xq.transpose(0, 1), xq[:, :30]):  # M = 90, 90 from a strided input, 60
            ys = project(xin, layers)
            assert [tuple(y.shape) for y in ys] == [(*xin.shape[:-1], n) for n in (40, 40, 24)]
            assert all(rel(y, xin @ d.T) < 1e-6 for y, (_, d) in zip(ys, qkv)), linear
            assert one_storage(ys) == (linear != "fused" and xin.shape[0] * xin.shape[1] > 64), (linear, xin.shape)
        mixed = [*layers[:2], FastLowBitLinear(weight(24, 256, "binary", 3)[0], device="cpu", linear=linear,
                                               workspace=ws, choices=table)]
        ys = project(xq, mixed)
        assert not one_storage(ys) and all(torch.equal(y, layer(xq)) for y, layer in zip(ys, mixed))
    checked += 1

    g = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (24, 256), generator=g)
    scale = (torch.rand(24, 4, generator=g) + 0.5).half()
    zero = (torch.rand(24, 4, generator=g) * 15).half()
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
    dense4 = (q.float().view(24, 4, 64) - zero.float()[..., None]) * scale.float()[..., None]
    y4 = FastInt4Linear(Int4Weight(packed, scale, zero, 64), device="cpu", workspace=ws)(x1)
    assert rel(y4, x1 @ dense4.view(24, 256).T) < 1e-6
    # the text encoder's q, k, v (and gate, up) as one GEMM over the weights side by side
    int4 = [FastInt4Linear(Int4Weight(packed[:n], scale[:n], zero[:n], 64), device="cpu", workspace=ws)
            for n in (24, 8, 8)]
    ys = project(x1, int4)
    assert len({y.untyped_storage().data_ptr() for y in ys}) == 1
    assert all(rel(y, x1 @ dense4.view(24, 256)[:n].T) < 1e-6 for y, n in zip(ys, (24, 8, 8)))
    checked += 1

    print("OK", checked)
    """
)


ELEMENTWISE_SCRIPT = textwrap.dedent(
    """
    import torch
    from bonsai.backends.cuda.elementwise import (add_rms_norm, conv_bias_add, conv_group_norm_silu, gated_add,
                                                  group_norm_silu, join_swiglu, modulate, rms_norm, rms_norm_rope,
                                                  silu_mul, softmax_rows, swiglu, text_norm_rope, upsample_nearest)
    from bonsai.backends.torch import text_encoder as te
    from bonsai.backends.torch.transformer import (gated_add as gated_add_ref, join_swiglu as join_swiglu_ref,
                                                   modulate as modulate_ref, norm_rope, swiglu as swiglu_ref)
    from bonsai.backends.torch.vae import GroupNorm, conv_add, conv_norm_act, norm_act, upsample

    torch.set_grad_enabled(False)
    g = torch.Generator().manual_seed(0)
    checked = 0

    def close(got, want, dtype, exact_frac, ulps=1):
        # fp16 (the interpreter rounds it as the GPU does): within one ulp of the torch code, and equal to it
        # nearly everywhere (the statistics are summed in another order). The interpreter truncates fp32 ->
        # bf16 instead of rounding (twice with the SiLU), so bf16 gets four ulps here;
        # tests/test_cuda_elementwise.py checks bf16 on the GPU.
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        ulps = ulps if dtype == torch.float16 else 4 * ulps
        # (near-zero outputs of the rotation inherit the rounding error of its inputs: the mean magnitude floors it)
        scale = torch.maximum(got.float().abs(), want.float().abs()).clamp_min(want.float().abs().mean())
        bound = ulps * torch.finfo(dtype).eps * scale
        assert ((got.float() - want.float()).abs() <= bound).all()
        if dtype == torch.float16:
            assert (got != want).float().mean().item() <= exact_frac

    for dtype in (torch.float16, torch.bfloat16):
        # C/G = 6 (not a power of two), H*W over several chunks with a ragged last one, one group per channel
        for b, c, h, w, groups in ((2, 24, 40, 37, 4), (1, 32, 8, 8, 32), (1, 16, 3, 5, 2)):
            norm = GroupNorm(groups, c, eps=1e-6)
            norm.weight.copy_(1 + 0.3 * torch.randn(c, generator=g))
            norm.bias.copy_(0.3 * torch.randn(c, generator=g))
            norm = norm.to(dtype)
            x = (torch.randn(b, c, h, w, generator=g) * 3 + 1.5).to(dtype)
            for fmt in (torch.contiguous_format, torch.channels_last):
                for silu in (False, True):
                    got = group_norm_silu(x.contiguous(memory_format=fmt), groups, norm.weight, norm.bias, 1e-6, silu)
                    assert got.is_contiguous(memory_format=fmt)
                    # a norm output rounded the other way (the statistics are summed in another order) moves the
                    # SiLU's output by up to two ulps
                    close(got, norm_act(norm, x, silu), dtype, 2e-3, ulps=2 if silu else 1)
                    checked += 1
        # a conv's bias folded into the norm after it and into the residual add; the 2x upsampling (exact).
        # The reference is torch's CUDA arithmetic, a cuDNN conv and its bias as a separate add (torch's CPU conv
        # adds the bias inside, rounded once).
        layer = torch.nn.Conv2d(16, 24, 3, padding=1).to(dtype)
        layer.bias.copy_(3 * torch.randn(24, generator=g))
        norm = GroupNorm(4, 24, eps=1e-6).to(dtype)
        for fmt in (torch.contiguous_format, torch.channels_last):
            layer = layer.to(memory_format=fmt)
            h = torch.randn(2, 16, 13, 11, generator=g).to(dtype).contiguous(memory_format=fmt)
            x = (2 * torch.randn(2, 24, 13, 11, generator=g)).to(dtype).contiguous(memory_format=fmt)
            conv = torch.nn.functional.conv2d(h, layer.weight, None, 1, 1) + layer.bias.view(1, -1, 1, 1)
            close(conv_group_norm_silu(layer, norm, h, True), norm_act(norm, conv, True), dtype, 2e-3, ulps=2)
            got = conv_bias_add(layer, h, x)
            assert got.is_contiguous(memory_format=fmt)
            close(got, x + conv, dtype, 0.0)
            close(conv_bias_add(layer, h), conv, dtype, 0.0)
            assert torch.equal(upsample_nearest(x), upsample(x))
            checked += 4
        # RMSNorm + RoPE of strided views (as the model passes them), text and image parts into one tensor
        b, heads, d, n_txt, n_img = 2, 3, 16, 5, 37
        proj_t = torch.randn(b, n_txt, 3 * heads * d, generator=g).to(dtype)
        proj_i = torch.randn(b, n_img, 3 * heads * d, generator=g).to(dtype)
        xt = proj_t[..., :heads * d].unflatten(-1, (heads, d))
        xi = proj_i[..., heads * d:2 * heads * d].unflatten(-1, (heads, d))
        wt, wi = ((1 + 0.2 * torch.randn(d, generator=g)).to(dtype) for _ in range(2))
        angles = torch.rand(n_txt + n_img, d // 2, generator=g) * 6
        freqs = torch.polar(torch.ones_like(angles), angles)
        for parts, fr in ((((xt, wt), (xi, wi)), freqs), (((xi, wi),), freqs[n_txt:])):
            close(rms_norm_rope(parts, 1e-6, fr), norm_rope(parts, 1e-6, fr), dtype, 0.0)
            checked += 1
        attn = torch.randn(b, 19, 48, generator=g).to(dtype)
        mlp = torch.randn(b, 19, 3 * 48 + 2 * 80, generator=g).to(dtype)[..., 3 * 48:]
        got = join_swiglu(attn, mlp)
        assert torch.equal(got[..., :48], attn)
        close(got, join_swiglu_ref(attn, mlp), dtype, 0.0)
        close(swiglu(mlp.contiguous()), swiglu_ref(mlp), dtype, 0.0)
        # gated residual, the gate a chunk of the modulation vector; fp16 clipped at the fp16 range
        x = (torch.randn(2, 37, 600, generator=g) * 6e3).to(dtype)
        y = (torch.randn(2, 37, 600, generator=g) * 1e4).to(dtype)  # gate * y overflows fp16 somewhere
        _, gate = (3 * torch.randn(2, 1, 2 * 600, generator=g)).to(dtype).chunk(2, dim=-1)
        for clip in (False, True):
            got, want = gated_add(x, gate, y, clip), gated_add_ref(x, gate, y, clip)
            assert torch.equal(got.isinf(), want.isinf()) and (dtype == torch.bfloat16 or clip != got.isinf().any())
            fin = ~want.isinf()
            close(got[fin], want[fin], dtype, 1e-3)
        # LayerNorm + modulation, shift and scale as chunks of the per-sample modulation vector
        x = (torch.randn(2, 37, 48, generator=g) * 2 + 0.5).to(dtype)
        _, shift, scale = (0.5 * torch.randn(2, 1, 3 * 48, generator=g)).to(dtype).chunk(3, dim=-1)
        close(modulate(x, shift, scale, 1e-6), modulate_ref(x, shift, scale, 1e-6), dtype, 2e-3)
        checked += 5
        # the text encoder's steps: RMSNorm (alone and after the residual add), the QK norm + rotate_half RoPE of
        # a strided view with the grouped-query repeat (and without), the SiLU-gated product
        norm = te.RMSNorm(600, 1e-6)
        norm.weight.copy_(1 + 0.2 * torch.randn(600, generator=g))
        norm = norm.to(dtype)
        x, y = ((torch.randn(2, 7, 600, generator=g) * 3).to(dtype) for _ in range(2))
        close(rms_norm(norm, x), te.rms_norm(norm, x), dtype, 2e-3)
        (s_got, got), (s_want, want) = add_rms_norm(norm, x, y), te.add_rms_norm(norm, x, y)
        close(s_got, s_want, dtype, 0.0)  # one rounding of the exact sum: equal in fp16
        close(got, want, dtype, 2e-3)
        qk = te.RMSNorm(16, 1e-6)
        qk.weight.copy_(1 + 0.2 * torch.randn(16, generator=g))
        qk = qk.to(dtype)
        proj = torch.randn(2, 19, 3 * 16 + 2 * 16, generator=g).to(dtype)
        xk = proj[..., 3 * 16:].unflatten(-1, (2, 16))  # 2 kv heads of a fused projection: rows strided
        freqs = torch.rand(19, 8, generator=g) * 6
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        for n_rep in (1, 3):
            got = text_norm_rope(qk, xk, cos, sin, n_rep)
            assert got.shape == (2, 2 * n_rep, 19, 16)
            # its rotation computes in the model dtype, which the interpreter gets wrong for bf16 (it keeps bf16
            # as truncated fp32 bits): fp16 here, bf16 on the GPU (tests/test_cuda_elementwise.py)
            if dtype == torch.float16:
                close(got, te.norm_rope(qk, xk, cos, sin, n_rep), dtype, 0.0, ulps=2)
        gate, up = ((torch.randn(2, 7, 300, generator=g) * 3).to(dtype) for _ in range(2))
        close(silu_mul(gate, up), te.silu_mul(gate, up), dtype, 0.0)
        checked += 5

    x = torch.randn(2, 24, 40, 37, generator=g) * 3 + 1.5
    weight, bias = 1 + 0.3 * torch.randn(24, generator=g), 0.3 * torch.randn(24, generator=g)
    want = torch.nn.functional.group_norm(x.double(), 4, weight.double(), bias.double(), 1e-6)
    for fmt in (torch.contiguous_format, torch.channels_last):
        got = group_norm_silu(x.contiguous(memory_format=fmt), 4, weight, bias, 1e-6, False)
        assert (got.double() - want).abs().max().item() < 1e-5
        checked += 1
    # channels_last statistics over chunks far from zero (shifted sums: no cancellation), a ragged last chunk
    x = (torch.randn(1, 256, 23, 29, generator=g) * 0.01 + 300.0).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.ones(256), torch.zeros(256)
    want = torch.nn.functional.group_norm(x.double(), 32, None, None, 1e-6)
    assert (group_norm_silu(x, 32, weight, bias, 1e-6, False).double() - want).abs().max().item() < 1e-2
    # float32 (the issue's gate: <= 1e-5 relative to the torch code in float32)
    rel = lambda got, want: ((got - want).abs().max() / want.abs().max()).item()  # noqa: E731
    proj = torch.randn(2, 37, 3 * 3 * 16, generator=g)
    xq, wq = proj[..., 16 * 3:2 * 16 * 3].unflatten(-1, (3, 16)), 1 + 0.2 * torch.randn(16, generator=g)
    angles = torch.rand(37, 8, generator=g) * 6
    fr = torch.polar(torch.ones_like(angles), angles)
    assert rel(rms_norm_rope(((xq, wq),), 1e-6, fr), norm_rope(((xq, wq),), 1e-6, fr)) <= 1e-5
    mlp = torch.randn(2, 19, 2 * 80, generator=g)
    attn = torch.randn(2, 19, 48, generator=g)
    assert rel(join_swiglu(attn, mlp), join_swiglu_ref(attn, mlp)) <= 1e-5
    assert rel(swiglu(mlp), swiglu_ref(mlp)) <= 1e-5
    x, y = torch.randn(2, 37, 600, generator=g), torch.randn(2, 37, 600, generator=g)
    _, shift, scale = (0.5 * torch.randn(2, 1, 3 * 600, generator=g)).chunk(3, dim=-1)
    assert rel(gated_add(x, scale, y), gated_add_ref(x, scale, y)) <= 1e-5
    assert rel(modulate(x, shift, scale, 1e-6), modulate_ref(x, shift, scale, 1e-6)) <= 1e-5
    norm, qk = te.RMSNorm(600, 1e-6), te.RMSNorm(16, 1e-6)
    for n in (norm, qk):
        n.weight.copy_(1 + 0.2 * torch.randn(n.weight.shape[0], generator=g))
    assert rel(rms_norm(norm, x), te.rms_norm(norm, x)) <= 1e-5
    assert rel(add_rms_norm(norm, x, y)[1], te.add_rms_norm(norm, x, y)[1]) <= 1e-5
    xk = torch.randn(2, 19, 2, 16, generator=g)
    freqs = torch.rand(19, 8, generator=g) * 6
    cos, sin = torch.cat((freqs, freqs), dim=-1).cos(), torch.cat((freqs, freqs), dim=-1).sin()
    assert rel(text_norm_rope(qk, xk, cos, sin, 4), te.norm_rope(qk, xk, cos, sin, 4)) <= 1e-5
    assert rel(silu_mul(x, y), te.silu_mul(x, y)) <= 1e-5
    # the VAE attention's softmax: rows of one, two and three blocks (ragged), scores of unit scale and scores
    # large enough that only the max subtraction keeps exp finite; bf16 within one ulp of the float64 softmax (the
    # interpreter truncates), what is below fp32's range flushed to zero
    for n, amp in ((300, 900.0), (4096 + 77, 20.0), (9000, 20.0)):
        s = torch.randn(5, n, generator=g) * amp
        want = torch.softmax(s.double() * 512**-0.5, dim=-1)
        bound = torch.finfo(torch.bfloat16).eps * want + torch.finfo(torch.float32).tiny
        assert ((softmax_rows(s, 512**-0.5).double() - want).abs() <= bound).all()
        assert rel(softmax_rows(s, 512**-0.5, torch.float32), want) <= 1e-5
        checked += 2
    layer, norm = torch.nn.Conv2d(16, 24, 3, padding=1).to(memory_format=torch.channels_last), GroupNorm(4, 24)
    h = torch.randn(2, 16, 13, 11, generator=g).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 24, 13, 11, generator=g).contiguous(memory_format=torch.channels_last)
    assert rel(conv_group_norm_silu(layer, norm, h, True), conv_norm_act(layer, norm, h, True)) <= 1e-5
    assert rel(conv_bias_add(layer, h, x), conv_add(layer, h, x)) <= 1e-5
    print("OK", checked + 11)
    """
)


NUMPY_OK = tuple(int(v) for v in np.__version__.split(".")[:2]) < (2, 3)
NUMPY_REASON = ("Triton 3.6's interpreter cannot run loops over runtime scalars with numpy >= 2.3 "
                "(CI pins numpy<2.3)")
SCRIPTS = {"expand": (SCRIPT, []), "gemm": (GEMM_SCRIPT, []), "layers": (LAYER_SCRIPT, ["expand"]),
           "layers-fused": (LAYER_SCRIPT, ["fused"]), "elementwise": (ELEMENTWISE_SCRIPT, [])}
NEEDS_NUMPY_OK = {"gemm", "layers-fused", "elementwise"}

# Runs each script as `python -c SCRIPT ARGS` would, in a fresh namespace, and prints {name: stdout or traceback}.
RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, sys, traceback

    results = {}
    for name, (script, args) in json.load(sys.stdin).items():
        sys.argv = ["-c", *args]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(script, f"<{name}>", "exec"), {"__name__": "__main__"})
            results[name] = {"ok": True, "stdout": out.getvalue()}
        except BaseException:
            results[name] = {"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()[-3000:]}
    print(json.dumps(results))
    """
)


@pytest.fixture(scope="module")
def interpreted() -> dict:
    """Every script that can run here, in one interpreted child process (each child pays the ~1.5 s import of
    torch and triton): name -> its stdout. Each test asserts on its own script's result."""
    scripts = {k: v for k, v in SCRIPTS.items() if NUMPY_OK or k not in NEEDS_NUMPY_OK}
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", RUNNER], input=json.dumps(scripts), env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def run_interpreted(interpreted: dict, name: str) -> str:
    result = interpreted[name]
    assert result["ok"], result["error"]
    return result["stdout"]


def test_expand_kernel_in_interpreter(interpreted):
    assert run_interpreted(interpreted, "expand").startswith("OK 16")


@pytest.mark.skipif(not NUMPY_OK, reason=NUMPY_REASON)
def test_fused_and_fp8_gemm_in_interpreter(interpreted):
    assert run_interpreted(interpreted, "gemm").startswith("OK 12")


def test_fast_layers_in_interpreter(interpreted):
    assert run_interpreted(interpreted, "layers").startswith("OK 4")


@pytest.mark.skipif(not NUMPY_OK, reason=NUMPY_REASON)
def test_fast_layers_fused_choice_in_interpreter(interpreted):
    assert run_interpreted(interpreted, "layers-fused").startswith("OK 5")


@pytest.mark.skipif(not NUMPY_OK, reason=NUMPY_REASON)
def test_elementwise_kernels_in_interpreter(interpreted):
    """group_norm_silu, rms_norm_rope, join_swiglu, swiglu, gated_add, modulate and the text encoder's steps
    against the torch code they replace, in fp16 and bf16 and in float32 (<= 1e-5 relative)."""
    assert run_interpreted(interpreted, "elementwise").startswith("OK 83")
