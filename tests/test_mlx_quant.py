"""Property tests: stock nn.QuantizedLinear (mx.quantized_matmul) over Bonsai's MLX tensors == x @ dequantize(W).T."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

mx = pytest.importorskip("mlx.core")

nn = pytest.importorskip("mlx.nn")

GROUP = 128


def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [out, in] -> uint32 [out, in * bits / 32], LSB-first along `in` (written from the MLX spec)."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    return np.bitwise_or.reduce(q << (np.arange(per, dtype=np.uint32) * bits)[None, None], axis=-1)


def case(seed: int, out_f: int, groups: int, batch: int, kind: str):
    """-> (t codes in {-1,0,1} or {-1,1}, per-group s, x)."""
    rng = np.random.default_rng(seed)
    in_f = groups * GROUP
    t = rng.integers(-1, 2, (out_f, in_f)) if kind == "ternary" else rng.choice([-1, 1], (out_f, in_f))
    s = rng.uniform(1e-3, 0.2, (out_f, groups)).astype(np.float32)
    x = rng.standard_normal((batch, in_f)).astype(np.float32)
    return t, s, x


def mlx_tensors(t: np.ndarray, s: np.ndarray, kind: str):
    """Released MLX encodings: ternary q = t + 1, scale s, bias -s; binary q = (t + 1) / 2, scale 2s, bias -s."""
    if kind == "ternary":
        return pack_mlx(t + 1, 2), s, -s, 2
    return pack_mlx((t + 1) // 2, 1), 2 * s, -s, 1


def linear(w, scales, biases, bits, dtype) -> nn.QuantizedLinear:
    """The transformer's low-bit layer: a stock QuantizedLinear holding the released tensors."""
    lin = nn.QuantizedLinear(w.shape[1] * 32 // bits, w.shape[0], bias=False, group_size=GROUP, bits=bits)
    lin.load_weights([("weight", mx.array(w)), ("scales", mx.array(scales).astype(dtype)),
                      ("biases", mx.array(biases).astype(dtype))])
    return lin


def rel(a, x, w) -> float:
    """max |a - x @ w.T| relative to |x| @ |w|.T: the scale of the summed terms, so that an output near zero by
    cancellation does not turn fp32 rounding of its terms into a large relative error."""
    x = x.astype(np.float64)
    return float((np.abs(np.asarray(a, np.float64) - x @ w.T) / np.maximum(np.abs(x) @ np.abs(w).T, 1e-30)).max())


shapes = dict(seed=st.integers(0, 2**31 - 1), out_f=st.integers(1, 48), groups=st.integers(1, 4),
              batch=st.integers(1, 5), kind=st.sampled_from(["ternary", "binary"]))


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_quantized_matmul_fp32(seed, out_f, groups, batch, kind):
    t, s, x = case(seed, out_f, groups, batch, kind)
    w, scales, biases, bits = mlx_tensors(t, s, kind)
    dense = t * np.repeat(s.astype(np.float64), GROUP, axis=1)  # W = t * s, in float64
    got = np.array(linear(w, scales, biases, bits, mx.float32)(mx.array(x)))
    assert rel(got, x, dense) <= 1e-5
    # mx.dequantize reads our tensors as the same W (the packing is MLX's own)
    deq = mx.dequantize(mx.array(w), mx.array(scales), mx.array(biases), group_size=GROUP, bits=bits)
    np.testing.assert_allclose(np.array(deq), dense, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(**shapes)
def test_quantized_matmul_fp16(seed, out_f, groups, batch, kind):
    t, s, x = case(seed, out_f, groups, batch, kind)
    w, scales, biases, bits = mlx_tensors(t, s, kind)
    x16 = x.astype(np.float16)
    s16 = s.astype(np.float16).astype(np.float64)  # the scale the fp16 layer holds
    dense = t * np.repeat(s16, GROUP, axis=1)
    got = np.array(linear(w, scales, biases, bits, mx.float16)(mx.array(x16)).astype(mx.float32))
    want = x16.astype(np.float64) @ dense.T
    # fp16 rounds partial sums: scale the error by the dot products' magnitude, not by a possibly cancelled result
    magnitude = np.abs(x16.astype(np.float64)) @ np.abs(dense).T
    assert float(np.abs(got - want).max() / magnitude.max()) <= 3e-3


def test_binary_and_ternary_code_rules():
    """Ternary never stores code 3; binary's affine form reaches exactly +-s."""
    t, s, _ = case(0, 4, 1, 1, "ternary")
    w, *_ = mlx_tensors(t, s, "ternary")
    fields = (w[..., None] >> (np.arange(16, dtype=np.uint32) * 2)) & 3
    assert fields.max() <= 2
    t, s, _ = case(1, 4, 1, 1, "binary")
    w, scales, biases, bits = mlx_tensors(t, s, "binary")
    deq = np.array(mx.dequantize(mx.array(w), mx.array(scales), mx.array(biases), group_size=GROUP, bits=1))
    np.testing.assert_allclose(np.abs(deq), np.repeat(s, GROUP, axis=1), rtol=1e-6)
