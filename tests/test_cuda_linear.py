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
    from bonsai.backends.cuda import linear as cl

    w, codes, scales = weights(in_f, out_f, kind)
    layer = cl.FastLowBitLinear(w, device="cuda")
    for dtype in (torch.bfloat16, torch.float16):
        for m in MS:
            x = torch.randn(m, in_f, device="cuda").to(dtype)
            cl.scratch(in_f * out_f, "cuda", dtype).fill_(float("nan"))
            poison(m * out_f, dtype)
            y = layer(x)
            assert y.dtype == dtype and y.shape == (m, out_f)
            assert torch.isfinite(y).all()
            assert rel(y, reference(x, codes, scales, dtype)) < 3e-3, (dtype, m)


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
    from bonsai.backends.cuda.linear import FastLowBitLinear

    w, _, _ = weights(3072, 3072, "ternary")
    with pytest.raises(ValueError, match="in_features"):
        FastLowBitLinear(w)(torch.zeros(2, 1024, device="cuda", dtype=torch.bfloat16))
