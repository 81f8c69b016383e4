"""A tiny full render through MLXRuntime (encode + denoise + decode) vs the torch reference path, same seed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("diffusers")

import test_mlx_text_encoder as te_case  # noqa: E402
import test_mlx_transformer as tr_case  # noqa: E402
import test_mlx_vae as vae_case  # noqa: E402

from bonsai import latents as L  # noqa: E402
from bonsai import sampling  # noqa: E402
from bonsai.backends.mlx.runtime import MLXRuntime, summarize  # noqa: E402
from bonsai.config import TextEncoderConfig, TransformerConfig, VAEConfig  # noqa: E402

HIDDEN = 128  # tiny Qwen3 hidden size -> joint_attention_dim = 3 * 128
LAYERS = te_case.LAYERS
SIGMAS = [1.0, 0.9, 0.6, 0.0]
HEIGHT, WIDTH = 48, 32


def write_mlx_repo(folder, kind):
    """A tiny repo in the released MLX layout; returns the torch reference models holding identical weights."""
    config = TransformerConfig(**{**tr_case.TINY, "joint_attention_dim": 3 * HIDDEN})
    ref_tr, mlx_w, bits = tr_case.make_weights(config, kind, seed=5)
    tr_case._write_packed(folder, config, mlx_w, bits)
    te_config = te_case.tiny_config()
    te_state = te_case._write_mlx_4bit(folder, te_config, te_case.random_state(te_config, seed=6))
    vae = vae_case.make_vae(seed=7)
    (folder / "vae").mkdir()
    (folder / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLFlux2", **{
        k: list(v) if isinstance(v, tuple) else v for k, v in vae_case.TINY.items()}}))
    # bf16 on disk as released; the reference gets the same rounded values
    state = {k: v.to(torch.bfloat16) for k, v in vae.state_dict().items() if v.is_floating_point()}
    mx.save_safetensors(str(folder / "vae" / "diffusion_pytorch_model.safetensors"),
                        {k: mx.array(v.float().numpy()).astype(mx.bfloat16) for k, v in state.items()})
    vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    # the transformer's dense tensors are bf16 on disk too
    sd = ref_tr.state_dict()
    ref_tr.load_state_dict({k: (v if k.startswith(("transformer_blocks", "single_transformer_blocks")) and v.ndim == 2
                                else v.to(torch.bfloat16).float()) for k, v in sd.items()})
    return config, ref_tr, te_config, te_state, vae


def torch_render(config, ref_tr, te_config, te_state, vae, ids, mask, seed):
    """The reference path, composed from diffusers/transformers models and bonsai's shared glue."""
    from bonsai.backends.torch.transformer import load_transformer as load_torch_tr
    from bonsai.backends.torch.vae import load_vae_decoder as load_torch_vae

    features = torch.from_numpy(te_case.reference(te_config, te_state, ids, mask))
    model = load_torch_tr(dict(ref_tr.state_dict()), config, dtype=torch.float32)
    h, w = L.latent_size(HEIGHT, WIDTH)
    x = L.pack(L.noise(seed, HEIGHT, WIDTH))
    img_ids, txt_ids = L.img_ids(h, w), L.txt_ids(ids.shape[1])
    with torch.no_grad():
        for i in range(len(SIGMAS) - 1):
            v = model(x, features, torch.full((1,), SIGMAS[i]), img_ids, txt_ids)
            x = x + (SIGMAS[i + 1] - SIGMAS[i]) * v
    torch_vae = load_torch_vae(vae.state_dict(), VAEConfig(**vae_case.TINY), dtype=torch.float32)
    return torch_vae.decode_latents(x, HEIGHT, WIDTH, tile=False)


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_tiny_render_matches_torch_reference(tmp_path, kind):
    config, ref_tr, te_config, te_state, vae = write_mlx_repo(tmp_path, kind)
    ids, mask = te_case.batch(seed=8)
    ids, mask = ids[:1], mask[:1]
    seed = 1234
    want = torch_render(config, ref_tr, te_config, te_state, vae, ids, mask, seed)

    rt = MLXRuntime.load(tmp_path, dtype="float32",
                         text_config=TextEncoderConfig(feature_layers=LAYERS, num_hidden_layers=5))
    assert rt.name == "mlx" and rt.kind == kind and rt.dtype == torch.float32
    rt.reset_peak_memory()
    features = rt.encode(ids, mask)
    assert not rt.text_encoder.resident  # freed after encoding
    h, w = L.latent_size(HEIGHT, WIDTH)
    cond = rt.condition([features], L.img_ids(h, w), L.txt_ids(ids.shape[1]))
    steps = []
    x = rt.latents(L.pack(L.noise(seed, HEIGHT, WIDTH)))
    for i, x in sampling.sample(lambda x, t: rt.velocity(x, t, cond), x, SIGMAS, rt.dtype):
        steps.append(i)
    got = rt.decode(x, HEIGHT, WIDTH)
    assert steps == [0, 1, 2]
    assert got.dtype == np.uint8 and got.shape == want.shape == (1, HEIGHT, WIDTH, 3)
    assert np.abs(got.astype(int) - want).max() <= 2
    report = rt.memory_report()
    assert set(report["stages"]) == {"encode", "denoise", "decode"}
    assert report["mean_active_gb"] > 0 and report["gb_s"] >= 0


def test_memory_summary_integrates_samples():
    s = summarize([(0.0, 1e9), (1.0, 3e9), (2.0, 3e9)])  # trapezoid: 2 + 3 GB*s over 2 s
    assert s["gb_s"] == pytest.approx(5.0) and s["mean_active_gb"] == pytest.approx(2.5)
    assert s["max_active_gb"] == pytest.approx(3.0)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        MLXRuntime.load(tmp_path / "nope")
    with pytest.raises(ValueError, match="dtype"):
        MLXRuntime.load(tmp_path, dtype="int8")
