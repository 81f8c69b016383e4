"""LowBitWeight: every layout round-trips bit-exactly, dequantization and matmul match independent references."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai.quant import LowBitWeight

G = 128


def np_gemlite_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """gemlite 0.5/0.6 `pack_weights_over_cols(W_q [out, in], bits, 8, transpose=True)`, written from the spec:
    packed column c holds inputs c*eps + k at bit k*bits, then the [out, in/eps] result is transposed."""
    eps = 8 // bits
    out, k = q.shape
    cols = q.reshape(out, k // eps, eps).astype(np.uint16)
    packed = np.zeros((out, k // eps), np.uint16)
    for i in range(eps):
        packed |= cols[:, :, i] << (i * bits)
    return np.ascontiguousarray(packed.astype(np.uint8).T)  # [in/eps, out]


def np_gemlite_dense(W_q, scales, zeros, bits, out, k):
    """The spec's reference dequantizer for W_group_mode 4: W = q * scales + zeros, returned [out, in]."""
    eps = 8 // bits
    Wp = np.asarray(W_q, np.uint8)
    shifts = (np.arange(eps, dtype=np.uint8) * bits)[None, :, None]
    q = ((Wp[:, None, :] >> shifts) & ((1 << bits) - 1)).reshape(k, out).astype(np.float64)
    return (q * np.repeat(np.asarray(scales, np.float64), G, 0) + np.repeat(np.asarray(zeros, np.float64), G, 0)).T


def random_case(seed, out, groups, kind):
    rng = np.random.default_rng(seed)
    k = groups * G
    t = rng.integers(-1, 2, (out, k)) if kind == "ternary" else rng.choice([-1, 1], (out, k))
    # bf16-exact scales: MLX stores bf16, so only those round-trip through every layout.
    s = torch.tensor(rng.uniform(1e-3, 0.5, (out, groups)), dtype=torch.bfloat16).float()
    return torch.from_numpy(t.astype(np.int8)), s


shapes = st.tuples(st.integers(0, 2**31 - 1), st.integers(1, 24), st.integers(1, 3), st.sampled_from(["ternary", "binary"]))


@settings(max_examples=40, deadline=None)
@given(shapes)
def test_layouts_round_trip_bit_exactly(case):
    seed, out, groups, kind = case
    t, s = random_case(seed, out, groups, kind)
    w = LowBitWeight.from_codes(t, s, kind)
    assert torch.equal(w.codes, t) and torch.equal(w.scales, s) and w.shape == (out, groups * G)
    for back in (LowBitWeight.from_gemlite(**w.to_gemlite()),
                 LowBitWeight.from_mlx(**w.to_mlx(), bits=w.bits),
                 LowBitWeight.from_compact(**w.to_compact(), kind=kind, in_features=groups * G)):
        assert back.kind == kind and torch.equal(back.packed, w.packed) and torch.equal(back.scales, w.scales)
    # Our quantizer reproduces a weight that is exactly s * codes, bit for bit.
    q = LowBitWeight.quantize(w.dequantize(), kind)
    assert torch.equal(q.codes, t) and torch.equal(q.scales, s)


@settings(max_examples=40, deadline=None)
@given(shapes, st.integers(1, 5))
def test_dequantize_and_matmul_match_dense_reference(case, m):
    seed, out, groups, kind = case
    t, s = random_case(seed, out, groups, kind)
    w = LowBitWeight.from_codes(t, s, kind)
    dense = t.double().numpy() * np.repeat(s.double().numpy(), G, axis=1)
    assert np.array_equal(w.dequantize(torch.float64).numpy(), dense)
    x = torch.randn(m, groups * G, generator=torch.Generator().manual_seed(seed % 1000), dtype=torch.float32)
    got = (x @ w.dequantize(torch.float32).T).double().numpy()
    want = x.double().numpy() @ dense.T
    # Relative to the magnitude of the products, so that a cancelled dot product does not hide fp32 rounding.
    magnitude = np.abs(x.double().numpy()) @ np.abs(dense).T
    assert np.linalg.norm(got - want) <= 1e-6 * np.linalg.norm(magnitude)
    # The released gemlite tensors decode, through the spec's own formula, to the same weight.
    gl = w.to_gemlite()
    assert np.array_equal(np_gemlite_dense(gl["W_q"], gl["scales"], gl["zeros"], w.bits, out, groups * G), dense)


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_gemlite_orientation_on_square_layers(kind):
    """W_q is [in/eps, out]: on a square layer a reader that skips the transpose still finds the right shape."""
    t, s = random_case(7, 256, 2, kind)
    bits = 2 if kind == "ternary" else 1
    q = (t + 1).numpy() if kind == "ternary" else ((t + 1) // 2).numpy()
    W_q = torch.from_numpy(np_gemlite_pack(q.astype(np.uint8), bits))
    scales = (s if kind == "ternary" else 2 * s).T.contiguous()
    meta = LowBitWeight.from_codes(t, s, kind).to_gemlite()
    w = LowBitWeight.from_gemlite(W_q, scales, -s.T.contiguous(), meta["metadata"], meta["orig_shape"])
    assert torch.equal(w.codes, t)
    assert torch.equal(W_q, meta["W_q"])
    # The orientation mistake (codes packed along `out`) fits the same shape here but decodes to another weight.
    eps, Wn = 8 // bits, W_q.numpy()
    wrong = np.stack([(Wn >> (i * bits)) & ((1 << bits) - 1) for i in range(eps)], 1).reshape(256, 256)
    assert wrong.shape == q.shape and not np.array_equal(wrong, q)


def test_quantize_method():
    """TWN-style ternary: |w| <= 0.7 * mean|w| -> 0, scale = mean of the kept |w|; binary: sign, mean |w|."""
    w = torch.tensor([[1.0, -2.0, 0.1, 3.0] * 32])
    tern = LowBitWeight.quantize(w, "ternary")
    mean = 6.1 / 4
    kept = [v for v in (1.0, 2.0, 0.1, 3.0) if v > 0.7 * mean]
    assert tern.codes[0, :4].tolist() == [0, -1, 0, 1]
    assert tern.scales.item() == pytest.approx(sum(kept) / len(kept))
    binr = LowBitWeight.quantize(w, "binary")
    assert binr.codes[0, :4].tolist() == [1, -1, 1, 1] and binr.scales.item() == pytest.approx(mean)


def _gemlite(kind="ternary"):
    t, s = random_case(3, 8, 1, kind)
    return LowBitWeight.from_codes(t, s, kind).to_gemlite()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64), st.integers(0, 3))
def test_code3_detected_in_any_slot(values, slot):
    """The validity check of ternary packs (no unpacking) finds a code 3 wherever it sits in a byte."""
    from bonsai.quant.packing import has_code3

    # Only codes 0..2 in every slot, then a 3 in one slot of one byte.
    clean = torch.tensor([sum(((v >> (2 * j)) % 3) << (2 * j) for j in range(4)) for v in values], dtype=torch.uint8)
    assert not has_code3(clean)
    bad = clean.clone()
    bad[len(values) // 2] |= 3 << (2 * slot)
    assert has_code3(bad)


def test_corrupted_gemlite_tensors_raise_clear_errors():
    gl = _gemlite()
    bad = dict(gl, W_q=gl["W_q"] | 0b11)  # code 3 in every byte's first slot
    with pytest.raises(ValueError, match="code 3"):
        LowBitWeight.from_gemlite(**bad, name="blocks.0.to_q")
    with pytest.raises(ValueError, match=r"blocks\.0\.to_q\.zeros"):
        LowBitWeight.from_gemlite(**dict(gl, zeros=gl["zeros"] * 0.5), name="blocks.0.to_q")
    with pytest.raises(ValueError, match="orig_shape"):
        LowBitWeight.from_gemlite(**dict(gl, orig_shape=torch.tensor([128, 8], dtype=torch.int32)))
    md = gl["metadata"].clone()
    md[10] = 3
    with pytest.raises(ValueError, match="W_group_mode"):
        LowBitWeight.from_gemlite(**dict(gl, metadata=md))
    gb = _gemlite("binary")
    with pytest.raises(ValueError, match="scales / 2"):
        LowBitWeight.from_gemlite(**dict(gb, zeros=-gb["scales"]))


def test_corrupted_mlx_and_compact_raise_clear_errors():
    t, s = random_case(4, 8, 2, "binary")
    m = LowBitWeight.from_codes(t, s, "binary").to_mlx()
    with pytest.raises(ValueError, match=r"x\.biases.*scales / 2"):
        LowBitWeight.from_mlx(m["weight"], m["scales"], m["scales"] * -1, bits=1, name="x")
    with pytest.raises(ValueError, match="bits must be 2"):
        LowBitWeight.from_mlx(**m, bits=4)
    with pytest.raises(ValueError, match=r"x\.scales"):
        LowBitWeight.from_mlx(m["weight"], m["scales"][:, :1], m["biases"], bits=1, name="x")
    t3, s3 = random_case(4, 8, 2, "ternary")
    c = LowBitWeight.from_codes(t3, s3, "ternary").to_compact()
    codes = c["codes"].clone()
    codes[0, 0] = 250
    with pytest.raises(ValueError, match="out of range"):
        LowBitWeight.from_compact(codes, c["scales"], "ternary", 256, name="y")
    with pytest.raises(ValueError, match=r"ternary codes must be in"):
        LowBitWeight.from_codes(torch.full((2, 128), 2), torch.ones(2, 1), "ternary")


def test_compact_is_small():
    t, s = random_case(5, 4, 10, "ternary")
    c = LowBitWeight.from_codes(t, s, "ternary").to_compact()
    assert c["codes"].shape == (4, 256) and c["scales"].element_size() == 2  # 1.6 bits per weight, 16-bit scales
