"""gemlite's own packer and LowBitWeight agree on the released gemlite layout, bit for bit (CUDA + gemlite)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (gemlite imports it)")

# (out, in): a square layer (the orientation trap: [in/eps, out] and [out, in/eps] look alike), wide, tall.
SHAPES = [(3072, 3072), (384, 1024), (1024, 256)]


def random_codes(out_f, in_f, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "ternary":
        t = torch.randint(-1, 2, (out_f, in_f), generator=g, dtype=torch.int8)
    else:
        t = torch.randint(0, 2, (out_f, in_f), generator=g, dtype=torch.int8) * 2 - 1
    s = torch.rand(out_f, in_f // 128, generator=g) + 0.25
    return t, s


def gemlite_pack(t, s, kind):
    """What gemlite itself stores for these codes (8-bit packing, fma zeros, float32 meta), on CUDA."""
    gemlite = pytest.importorskip("gemlite")
    out_f, in_f = t.shape
    bits = 2 if kind == "ternary" else 1
    layer = gemlite.GemLiteLinearTriton(W_nbits=bits, group_size=128, in_features=in_f, out_features=out_f,
                                        input_dtype=gemlite.DType.FP16, output_dtype=gemlite.DType.FP16)
    q = (t + 1 if kind == "ternary" else (t + 1) // 2).to(torch.uint8).cuda()  # gemlite's unsigned codes
    s = s.cuda()
    if kind == "ternary":
        layer.pack(q, s, torch.ones_like(s), packing_bitwidth=8)  # W = q * s - s
    else:
        layer.pack(q, 2 * s, torch.full_like(s, 0.5), packing_bitwidth=8)  # W = q * 2s - s
    return {k: getattr(layer, k).detach().cpu() for k in ("W_q", "scales", "zeros", "metadata", "orig_shape")}


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_to_gemlite_equals_gemlite_pack(kind, out_f, in_f):
    from bonsai.quant.lowbit import LowBitWeight

    t, s = random_codes(out_f, in_f, kind, seed=out_f * 7 + in_f)
    ref = gemlite_pack(t, s, kind)
    ours = LowBitWeight.from_codes(t, s, kind).to_gemlite()
    assert ref["W_q"].dtype == torch.uint8 and tuple(ref["W_q"].shape) == (in_f * (2 if kind == "ternary" else 1) // 8, out_f)
    for key in ("W_q", "scales", "zeros", "metadata", "orig_shape"):
        assert ours[key].dtype == ref[key].dtype, key
        assert torch.equal(ours[key], ref[key]), key


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("out_f,in_f", SHAPES)
def test_from_gemlite_of_gemlite_pack_gives_codes_back(kind, out_f, in_f):
    from bonsai.quant.lowbit import LowBitWeight

    t, s = random_codes(out_f, in_f, kind, seed=out_f * 11 + in_f)
    ref = gemlite_pack(t, s, kind)
    w = LowBitWeight.from_gemlite(ref["W_q"], ref["scales"], ref["zeros"], ref["metadata"], ref["orig_shape"])
    assert w.kind == kind and w.shape == (out_f, in_f)
    assert torch.equal(w.codes, t)
    assert torch.equal(w.scales, s)
