"""MLX transformer vs diffusers' Flux2Transformer2DModel on a tiny config with identical low-bit weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
diffusers = pytest.importorskip("diffusers")

from bonsai.backends.mlx import transformer as mt  # noqa: E402
from bonsai.config import TransformerConfig  # noqa: E402
from bonsai.latents import img_ids, txt_ids  # noqa: E402

from bonsai.layouts import MLX

TINY = dict(num_layers=1, num_single_layers=2, attention_head_dim=32, num_attention_heads=4,
            joint_attention_dim=256, axes_dims_rope=(8, 8, 8, 8), in_channels=128)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def pack_mlx(q: np.ndarray, bits: int) -> np.ndarray:
    """Codes [out, in] -> uint32 [out, in * bits / 32], LSB-first along `in` (MLX affine layout)."""
    per = 32 // bits
    q = q.astype(np.uint32).reshape(q.shape[0], -1, per)
    shifts = (np.arange(per, dtype=np.uint32) * bits)[None, None]
    return np.bitwise_or.reduce(q << shifts, axis=-1)


def lowbit(rng: np.random.Generator, out_f: int, in_f: int, kind: str, group: int = 128):
    """Random ternary/binary weight -> (dense fp32 W, MLX weight/scales/biases as numpy)."""
    t = rng.integers(-1, 2, (out_f, in_f)) if kind == "ternary" else rng.choice([-1, 1], (out_f, in_f))
    # scales representable in bf16 so the bf16 file holds them exactly
    s = torch.tensor(rng.uniform(0.02, 0.08, (out_f, in_f // group)), dtype=torch.bfloat16).float().numpy()
    dense = (t * np.repeat(s, group, axis=1)).astype(np.float32)
    if kind == "ternary":
        return dense, pack_mlx(t + 1, 2), s, -s
    return dense, pack_mlx((t + 1) // 2, 1), 2 * s, -s


def make_weights(config: TransformerConfig, kind: str, seed: int = 0):
    """-> (diffusers state dict fp32, MLX-layout numpy dict, bits). The 100-linear rule: block linears are low-bit."""
    from diffusers import Flux2Transformer2DModel

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    ref = Flux2Transformer2DModel(**{k: v for k, v in vars(config).items()})
    state, mlx_w = {}, {}
    for key, p in ref.state_dict().items():
        is_block = key.startswith(("transformer_blocks.", "single_transformer_blocks."))
        if is_block and p.ndim == 2:
            dense, w, s, b = lowbit(rng, *p.shape, kind)
            prefix = key[: -len(".weight")]
            state[key] = torch.from_numpy(dense)
            mlx_w.update({f"{prefix}.weight": w, f"{prefix}.scales": s, f"{prefix}.biases": b})
        else:
            scale = 1.0 if p.ndim == 1 else 1.0 / np.sqrt(p.shape[1])
            v = (1.0 + 0.1 * rng.standard_normal(p.shape)) if p.ndim == 1 else rng.standard_normal(p.shape) * scale
            state[key] = torch.from_numpy(v.astype(np.float32))
            mlx_w[key] = state[key].numpy()
    ref.load_state_dict(state)
    return ref.eval(), mlx_w, (2 if kind == "ternary" else 1)


def inputs(config: TransformerConfig, h=2, w=3, n_txt=7, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, h * w, config.in_channels, generator=g)
    c = torch.randn(batch, n_txt, config.joint_attention_dim, generator=g)
    sigma = torch.tensor([0.9, 0.55])[:batch]
    return x, c, sigma, img_ids(h, w), txt_ids(n_txt)


def mlx_forward(model, x, c, sigma, iids, tids, dtype=mx.float32):
    out = model(mx.array(x.numpy()).astype(dtype), mx.array(c.numpy()).astype(dtype),
                mx.array(sigma.numpy()).astype(dtype), iids, tids)
    return np.array(out.astype(mx.float32))


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_transformer_matches_diffusers(kind):
    config = TransformerConfig(**TINY)
    ref, mlx_w, bits = make_weights(config, kind)
    model = mt.load_transformer({k: mx.array(v) for k, v in mlx_w.items()}, config, bits, dtype="float32")
    assert isinstance(model.transformer_blocks[0].attn.to_q, mt.nn.QuantizedLinear)
    assert isinstance(model.x_embedder, mt.nn.Linear)
    x, c, sigma, iids, tids = inputs(config)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=c, timestep=sigma, img_ids=iids, txt_ids=tids,
                   guidance=None, return_dict=False)[0].numpy()
    got = mlx_forward(model, x, c, sigma, iids, tids)
    assert got.shape == want.shape
    assert rel(got, want) <= 1e-4
    # the dense baseline (dequantized weights as plain matmuls) computes the same function
    dense = mt.load_transformer({k: mx.array(v) for k, v in mlx_w.items()}, config, bits, dtype="float32",
                                 dense=True)
    assert isinstance(dense.transformer_blocks[0].attn.to_q, mt.nn.Linear)
    assert rel(mlx_forward(dense, x, c, sigma, iids, tids), want) <= 1e-4


def test_transformer_matches_torch_reference():
    """Same dense-equivalent weights through bonsai's torch reference backend."""
    from bonsai.backends.torch.transformer import load_transformer as load_torch

    config = TransformerConfig(**TINY)
    ref, mlx_w, bits = make_weights(config, "ternary", seed=3)
    torch_model = load_torch(dict(ref.state_dict()), config, dtype=torch.float32)
    model = mt.load_transformer({k: mx.array(v) for k, v in mlx_w.items()}, config, bits, dtype="float32")
    x, c, sigma, iids, tids = inputs(config, h=3, w=2, n_txt=5, seed=4)
    with torch.no_grad():
        want = torch_model(x, c, sigma, iids, tids).numpy()
    assert rel(mlx_forward(model, x, c, sigma, iids, tids), want) <= 1e-4


def test_transformer_fp16_close():
    config = TransformerConfig(**TINY)
    ref, mlx_w, bits = make_weights(config, "ternary")
    model = mt.load_transformer({k: mx.array(v) for k, v in mlx_w.items()}, config, bits, dtype="float16")
    x, c, sigma, iids, tids = inputs(config)
    with torch.no_grad():
        want = ref(hidden_states=x, encoder_hidden_states=c, timestep=sigma, img_ids=iids, txt_ids=tids,
                   guidance=None, return_dict=False)[0].numpy()
    assert rel(mlx_forward(model, x, c, sigma, iids, tids, mx.float16), want) <= 3e-3


def _write_packed(folder, config, mlx_w, bits):
    d = folder / mt.PACKED_DIR
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps({"_class_name": "Flux2Transformer2DModel", **{
        k: list(v) if isinstance(v, tuple) else v for k, v in vars(config).items()}}))
    (d / "quantization_config.json").write_text(json.dumps({"bits": bits, "group_size": 128}))
    arrays = {}
    for k, v in mlx_w.items():
        a = mx.array(v)
        arrays[k] = a if a.dtype == mx.uint32 else a.astype(mx.bfloat16)
    mx.save_safetensors(str(d / MLX.weight_file), arrays)
    return d


def test_load_packed_mflux_folder(tmp_path):
    config = TransformerConfig(**TINY)
    _, mlx_w, bits = make_weights(config, "binary")
    _write_packed(tmp_path, config, mlx_w, bits)
    model, kind = mt.load_transformer_folder(tmp_path, dtype="float32")
    assert kind == "binary"
    lin = model.single_transformer_blocks[1].attn.to_out
    assert isinstance(lin, mt.nn.QuantizedLinear) and (lin.bits, lin.group_size, lin.mode) == (1, 128, "affine")
    # the released uint32 codes are used as stored
    np.testing.assert_array_equal(np.array(lin.weight), mlx_w["single_transformer_blocks.1.attn.to_out.weight"])


def test_load_rejects_bad_packs(tmp_path):
    config = TransformerConfig(**TINY)
    _, mlx_w, bits = make_weights(config, "ternary")
    key = "transformer_blocks.0.attn.to_q"
    bad = dict(mlx_w)
    bad[f"{key}.biases"] = -bad[f"{key}.scales"] * 0.5
    _write_packed(tmp_path / "a", config, bad, bits)
    with pytest.raises(ValueError, match="biases == -scales"):
        mt.load_transformer_folder(tmp_path / "a", dtype="float32")
    bad = dict(mlx_w)
    bad[f"{key}.weight"] = bad[f"{key}.weight"] | np.uint32(3)  # code 3 in the first field
    _write_packed(tmp_path / "b", config, bad, bits)
    with pytest.raises(ValueError, match="code 3"):
        mt.load_transformer_folder(tmp_path / "b", dtype="float32")
    bad = {k: v for k, v in mlx_w.items() if k != "proj_out.weight"}
    _write_packed(tmp_path / "c", config, bad, bits)
    with pytest.raises(ValueError, match="proj_out.weight"):
        mt.load_transformer_folder(tmp_path / "c", dtype="float32")
    _write_packed(tmp_path / "d", config, mlx_w, 1)  # config says 1 bit, tensors are 2-bit
    with pytest.raises(ValueError, match="shape"):
        mt.load_transformer_folder(tmp_path / "d", dtype="float32")
