"""CUDA linears (fast path, gemlite) against x @ W.T with W built from the codes in the test itself."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

FLUX_SHAPES = [(3072, 3072), (3072, 18432), (9216, 3072), (3072, 27648), (12288, 3072)]  # (in, out)
MS = [1, 64, 512, 1536, 4608]


def make_weight(out_f, in_f, kind, seed=0):
    """(weight, codes int8 [out, in] on cuda, scales float32 [out, in/128] on cuda)."""
    g = torch.Generator("cuda").manual_seed(seed)
    if kind == "ternary":
        codes = torch.randint(-1, 2, (out_f, in_f), generator=g, device="cuda", dtype=torch.int8)
    else:
        codes = torch.randint(0, 2, (out_f, in_f), generator=g, device="cuda", dtype=torch.int8) * 2 - 1
    scales = (torch.rand(out_f, in_f // 128, generator=g, device="cuda") + 0.5) / math.sqrt(in_f)
    from bonsai.quant.lowbit import LowBitWeight

    return LowBitWeight.from_codes(codes.cpu(), scales.cpu(), kind), codes, scales


def reference(x, codes, scales, dtype):
    w = codes.to(dtype) * scales.to(dtype).repeat_interleave(128, dim=1)  # [out, in], exact in dtype
    return x.float() @ w.float().T


def rel(y, ref):
    return ((y.float() - ref).norm() / ref.norm()).item()


def poison(numel, dtype):
    # Fill freed allocator blocks with NaN so an output the kernel never writes shows up as NaN.
    t = torch.full((numel * 2,), float("nan"), device="cuda", dtype=dtype)
    del t


@pytest.fixture(scope="module")
def weights():
    cache = {}

    def get(in_f, out_f, kind):
        if (in_f, out_f, kind) not in cache:
            cache.clear()  # one big weight at a time keeps host and GPU memory small
            cache[(in_f, out_f, kind)] = make_weight(out_f, in_f, kind, seed=in_f + out_f)
        return cache[(in_f, out_f, kind)]

    return get


@pytest.fixture(scope="module")
def gemlite_tuned():
    pytest.importorskip("gemlite")
    from bonsai.backends.cuda import gemlite as glb

    glb.load_autotune(glb.autotune_cache_path())
    yield glb
    glb.save_autotune(glb.autotune_cache_path())


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("in_f,out_f", FLUX_SHAPES)
def test_fast_path_flux_shapes(weights, kind, in_f, out_f):
    """Every GEMM the fast path may pick (expand + cuBLAS, each fused Triton config), and the measured "auto"."""
    from bonsai.backends.cuda import linear as cl
    from bonsai.backends.cuda.choice import GemmChoices

    w, codes, scales = weights(in_f, out_f, kind)
    ws, choices = cl.Workspace("cuda"), GemmChoices()
    layer = cl.FastLowBitLinear(w, device="cuda", linear="auto", workspace=ws, choices=choices)
    for dtype in (torch.bfloat16, torch.float16):
        for m in MS:
            x = torch.randn(m, in_f, device="cuda").to(dtype)
            ref = reference(x, codes, scales, dtype)
            for impl in cl.candidates("auto", False, m):
                scratch = ws.buffer(dtype, in_f * out_f)
                scratch.fill_(float("nan"))
                poison(m * out_f, dtype)
                y = cl._run(impl, x, layer.packed, layer.scales, layer.bits, 128, in_f, scratch)
                assert y.dtype == dtype and y.shape == (m, out_f)
                assert torch.isfinite(y).all(), impl
                assert rel(y, ref) < 3e-3, (impl, dtype, m)
            poison(m * out_f, dtype)
            y = layer(x.view(1, m, in_f))  # leading dims are kept
            assert y.shape == (1, m, out_f) and rel(y.view(m, out_f), ref) < 3e-3, (dtype, m)
            picked = choices.get(layer.gemm_key(m, dtype))
            assert picked in cl.candidates("auto", False, m)
    assert len(choices) == 2 * len(MS) and choices.unsaved  # one measured choice per (dtype, M)


def fp8_reference(x):
    """Per (token, 128-group) e4m3 quantization done in torch: the rule quantize_fp8 must follow."""
    xg = x.float().view(x.shape[0], -1, 128)
    amax = xg.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
    q = (xg / s).to(torch.float8_e4m3fn)
    return q.view(x.shape), s.squeeze(-1), (q.float() * s).view(x.shape)


def token_major(s):
    """s [M, G] copied into strides (1, M), the layout quantize_fp8 returns and cuBLAS's block scaling reads."""
    return torch.empty_strided(s.shape, (1, s.shape[0]), device=s.device, dtype=s.dtype).copy_(s)


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("in_f,out_f", FLUX_SHAPES)
def test_fp8_path_flux_shapes(weights, kind, in_f, out_f):
    """fp8 activations: the kernels equal the matmul of the torch-quantized input (exact weights); the error
    against the unquantized input is printed (it is the price of fp8, not a kernel error)."""
    from bonsai.backends.cuda import linear as cl
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.kernels import quantize_fp8

    w, codes, scales = weights(in_f, out_f, kind)
    ws = cl.Workspace("cuda")
    layer = cl.FastLowBitLinear(w, device="cuda", linear="auto", activations="fp8", workspace=ws,
                                choices=GemmChoices())
    expand = cl.FastLowBitLinear(w, device="cuda", linear="expand", activations="fp8", workspace=ws,
                                 choices=GemmChoices())
    dtype = torch.bfloat16
    errs = []
    for m in MS:
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        q_ref, s_ref, xq = fp8_reference(x)
        q, s = quantize_fp8(x)
        assert torch.equal(s, s_ref) and s.stride() == (1, m)  # token-major, as cuBLAS's block scaling reads
        # x / s may differ by an fp32 ulp from torch's division, which can move a value across an e4m3 tie.
        differ = (q.float() != q_ref.float()).float().mean().item()
        assert differ < 1e-3, differ
        ref = reference(xq, codes, scales, torch.float32)
        names = cl.candidates("auto", True, m, blockwise=cl.blockwise_fp8(x.device, m, out_f))
        assert (names[0] == "cublas8") == (m % 4 == 0)  # the H200 is Hopper; cuBLAS refuses M = 1
        for impl in names:
            scratch = ws.buffer(torch.float8_e4m3fn, in_f * out_f)
            scratch.view(torch.uint8).fill_(0x7F)  # e4m3 NaN
            sscratch = ws.buffer(torch.float32, in_f * out_f // 128)
            sscratch.fill_(float("nan"))
            poison(m * out_f, dtype)
            y = cl._run(impl, x, layer.packed, layer.scales, layer.bits, 128, in_f, scratch,
                        x8=(q_ref, token_major(s_ref)), scale_scratch=sscratch)
            assert y.dtype == dtype and torch.isfinite(y).all(), impl
            assert rel(y, ref) < 3e-3, (impl, m)
        y = layer(x)
        assert layer.choices.get(layer.gemm_key(m, dtype)) in names
        assert rel(expand(x), ref) < 3e-3, m  # cuBLAS's GEMM, or the fused one where cuBLAS refuses M
        errs.append(rel(y, reference(x, codes, scales, dtype)))
        assert errs[-1] < 0.1, (m, errs[-1])
    print(f"fp8 {kind} {in_f}->{out_f}: rel err vs bf16 input per M {dict(zip(MS, (round(e, 4) for e in errs)))}")


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("activations", [None, "fp8"])
def test_projections_together_flux_width(kind, activations):
    """A double block stream's q, k, v at real width through `project`: above M = 64 one GEMM (the outputs are
    column slices of one product), each slice as close to x @ W.T as the layer alone, and to the layer's own
    output (fp8: the same quantized input, so only the GEMM's rounding differs)."""
    from bonsai.backends.cuda import linear as cl
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.torch.linear import project

    made = [make_weight(3072, 3072, kind, seed=i) for i in range(3)]
    ws, choices = cl.Workspace("cuda"), GemmChoices()
    layers = [cl.FastLowBitLinear(w, linear="auto", activations=activations, workspace=ws, choices=choices)
              for w, _, _ in made]
    for m in (64, 512, 1024, 4096):
        x = torch.randn(1, m, 3072, device="cuda").to(torch.bfloat16)
        poison(3 * m * 3072, torch.bfloat16)
        ys = project(x, layers)
        assert len({y.untyped_storage().data_ptr() for y in ys}) == (1 if m > 64 else 3), m
        for y, layer, (_, codes, scales) in zip(ys, layers, made):
            assert y.shape == (1, m, 3072) and torch.isfinite(y).all(), m
            assert rel(y.view(m, 3072), layer(x).view(m, 3072).float()) < 3e-3, m
            ref = reference(x.view(m, 3072), codes, scales, torch.bfloat16)
            assert rel(y.view(m, 3072), ref) < (3e-3 if activations is None else 0.1), m


def test_text_encoder_projections_together_real_width():
    """The 4-bit text encoder's q, k, v (2560 -> 4096 + 2 x 1024) and gate, up (2560 -> 2 x 9728) at 512 prompt
    tokens through `project`: one GEMM, each slice as close to x @ W.T (W dequantized in the test) as one layer."""
    from bonsai.backends.cuda import linear as cl
    from bonsai.backends.torch.linear import project
    from bonsai.quant.qwen4bit import Int4Weight

    g = torch.Generator("cuda").manual_seed(0)
    ws = cl.Workspace("cuda")
    x = torch.randn(1, 512, 2560, device="cuda", generator=g).to(torch.bfloat16)
    for widths in ((4096, 1024, 1024), (9728, 9728)):
        layers, dense = [], []
        for n in widths:
            q = torch.randint(0, 16, (n, 2560), generator=g, device="cuda")
            scale = (torch.rand(n, 40, generator=g, device="cuda") / 40).to(torch.bfloat16)
            zero = (torch.rand(n, 40, generator=g, device="cuda") * 15).to(torch.bfloat16)
            packed = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)
            layers.append(cl.FastInt4Linear(Int4Weight(packed, scale, zero, 64), device="cuda", workspace=ws))
            w = (q.view(n, 40, 64).float() - zero.float()[..., None]) * scale.float()[..., None]  # [n, groups, 64]
            dense.append(w.view(n, 2560))
        poison(512 * sum(widths), torch.bfloat16)
        ys = project(x, layers)
        assert len({y.untyped_storage().data_ptr() for y in ys}) == 1
        for y, layer, w in zip(ys, layers, dense):
            assert y.shape == (1, 512, w.shape[0]) and torch.isfinite(y).all()
            assert rel(y[0], x[0].float() @ w.T) < 3e-3 and rel(y, layer(x).float()) < 3e-3, widths


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_fast_path_expand_matches_torch_dequantize(weights, kind):
    from bonsai.backends.cuda.kernels import expand_lowbit

    w, codes, scales = weights(3072, 3072, kind)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        out = torch.full((3072, 3072), float("nan"), device="cuda", dtype=dtype)
        expand_lowbit(w.packed.cuda(), w.scales.cuda(), w.bits, 128, 3072, out)
        expected = codes.to(dtype) * scales.to(dtype).repeat_interleave(128, dim=1)
        assert torch.equal(out, expected)
        assert torch.equal(out.cpu(), w.dequantize(dtype))


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("in_f,out_f", FLUX_SHAPES)
def test_gemlite_released_layout_flux_shapes(weights, gemlite_tuned, kind, in_f, out_f):
    # The released layout as stored (float32 scales/zeros, 8-bit packing), loaded without repacking.
    w, codes, scales = weights(in_f, out_f, kind)
    dtype = torch.bfloat16
    layer = gemlite_tuned.make_gemlite_linear(gemlite_tuned.GemliteState(w.to_gemlite()), device="cuda", dtype=dtype)
    assert layer.W_q.dtype == torch.uint8 and layer.scales.dtype == torch.float32
    for m in MS:
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        poison(m * out_f, dtype)
        y = layer(x)
        assert y.shape == (m, out_f) and torch.isfinite(y).all()
        assert rel(y, reference(x, codes, scales, dtype)) < 3e-3, m


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("in_f,out_f", [(3072, 3072), (12288, 3072)])
def test_gemlite_packed_from_lowbit(weights, gemlite_tuned, kind, dtype, in_f, out_f):
    w, codes, scales = weights(in_f, out_f, kind)
    layer = gemlite_tuned.from_lowbit(w, device="cuda", dtype=dtype)
    for m in MS:
        x = torch.randn(m, in_f, device="cuda").to(dtype)
        poison(m * out_f, dtype)
        y = layer(x)
        assert y.dtype == dtype and torch.isfinite(y).all()
        assert rel(y, reference(x, codes, scales, dtype)) < 3e-3, m


def test_fast_linear_rejects_wrong_width(weights):
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import FastLowBitLinear, Workspace

    w, _, _ = weights(3072, 3072, "ternary")
    layer = FastLowBitLinear(w, workspace=Workspace("cuda"), choices=GemmChoices())
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.zeros(2, 1024, device="cuda", dtype=torch.bfloat16))


def test_measured_choice_is_kept_by_its_table_only(weights, tmp_path):
    """Two tables (two runtimes) keep their own choices; a table loaded from a saved file gives its choice
    without measuring again (no candidate is timed: its record keeps the times of the first measurement)."""
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import FastLowBitLinear, Workspace, candidates

    w, codes, scales = weights(3072, 3072, "ternary")
    x = torch.randn(1536, 3072, device="cuda", dtype=torch.bfloat16)
    ref = reference(x, codes, scales, torch.bfloat16)
    a, b = GemmChoices(), GemmChoices()
    la = FastLowBitLinear(w, workspace=Workspace("cuda"), choices=a)
    assert rel(la(x), ref) < 3e-3
    key = la.gemm_key(1536, torch.bfloat16)
    (record,) = a.records()
    assert record.key == key and b.get(key) is None
    assert set(dict(record.times_ms)) <= set(candidates("auto", False, 1536)) and record.impl in dict(record.times_ms)
    a.save(tmp_path / "gemm.json")
    assert b.load(tmp_path / "gemm.json") and b.get(key) == record.impl
    lb = FastLowBitLinear(w, workspace=Workspace("cuda"), choices=b)
    assert rel(lb(x), ref) < 3e-3
    assert b.records() == [record] and not b.unsaved  # nothing was measured again
