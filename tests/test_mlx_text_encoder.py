"""MLX Qwen3 text features vs transformers' Qwen3Model (hidden_states 1..n, causal + padding mask)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
transformers = pytest.importorskip("transformers")

from bonsai.backends.mlx import text_encoder as te  # noqa: E402

LAYERS = (1, 3, 4)


def tiny_config() -> "transformers.Qwen3Config":
    return transformers.Qwen3Config(
        vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=5, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
        max_position_embeddings=64, attn_implementation="eager")


def reference(config, state, ids, mask) -> np.ndarray:
    """Features [B, S, 3 * hidden] = concat(hidden_states[k] for k in LAYERS) from transformers."""
    model = transformers.Qwen3Model(config).eval()
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
    return torch.cat([hs[k] for k in LAYERS], dim=-1).numpy()


def random_state(config, seed=0) -> dict:
    torch.manual_seed(seed)
    model = transformers.Qwen3Model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.05 * torch.randn_like(p))
    return model.state_dict()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.int64)
    mask[0, 7:] = 0  # right padding, as the pipeline's tokenizer does
    mask[1, 10:] = 0
    return ids, mask


def rel(a, b):
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


def test_dense_features_match_transformers():
    config = tiny_config()
    state = random_state(config)
    ids, mask = batch()
    want = reference(config, state, ids, mask)
    model = te.load_text_encoder(config.to_dict(), state, layers=LAYERS, dtype="float32")
    assert len(model.model.layers) == max(LAYERS)  # layer 5 and the final norm are never built
    got = np.array(te.encode(model, ids, mask, LAYERS))
    assert got.shape == want.shape == (2, 12, 3 * 128)
    assert rel(got, want) <= 1e-4


def _write_mlx_4bit(folder, config, state):
    """A text_encoder-mlx-4bit folder: mlx-community layout, 4-bit g64 linears and embedding."""
    d = folder / te.MLX_TE_DIR
    d.mkdir(parents=True)
    arrays, dense_state = {}, {}
    for key, t in state.items():
        a = mx.array(t.numpy())
        if a.ndim == 2:
            w, s, b = mx.quantize(a, group_size=64, bits=4)
            prefix = f"model.{key[: -len('.weight')]}"
            arrays.update({f"{prefix}.weight": w, f"{prefix}.scales": s.astype(mx.bfloat16),
                           f"{prefix}.biases": b.astype(mx.bfloat16)})
            s, b = (t.astype(mx.bfloat16).astype(mx.float32) for t in (s, b))  # what the bf16 file holds
            deq = mx.dequantize(w, s, b, group_size=64, bits=4)
            dense_state[key] = torch.from_numpy(np.array(deq.astype(mx.float32)))
        else:
            arrays[f"model.{key}"] = a.astype(mx.bfloat16)
            dense_state[key] = torch.from_numpy(np.array(a.astype(mx.bfloat16).astype(mx.float32)))
    mx.save_safetensors(str(d / "model.safetensors"), arrays)
    cfg = {**config.to_dict(), "quantization": {"group_size": 64, "bits": 4}}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model.safetensors" for k in arrays}}))
    return dense_state


def test_mlx_4bit_folder_matches_dequantized_reference(tmp_path):
    config = tiny_config()
    dense_state = _write_mlx_4bit(tmp_path, config, random_state(config, seed=2))
    ids, mask = batch(seed=3)
    want = reference(config, dense_state, ids, mask)
    model = te.load_text_encoder_folder(tmp_path, layers=LAYERS, dtype="float32")
    assert isinstance(model.model.layers[0].mlp.up_proj, te.nn.QuantizedLinear)
    assert isinstance(model.model.embed_tokens, te.nn.QuantizedEmbedding)
    got = np.array(te.encode(model, ids, mask, LAYERS))
    assert rel(got, want) <= 1e-4


def test_rejects_missing_layer(tmp_path):
    config = tiny_config()
    state = {k: v for k, v in random_state(config).items() if not k.startswith("layers.2.mlp.down_proj")}
    with pytest.raises(ValueError, match="model.layers.2.mlp.down_proj.weight"):
        te.load_text_encoder(config.to_dict(), state, layers=LAYERS, dtype="float32")
    with pytest.raises(ValueError, match="num_hidden_layers"):
        te.load_text_encoder(config.to_dict(), random_state(config), layers=(9,), dtype="float32")
