"""Qwen3 text encoder in MLX (the torch encoder's mirror, on mlx.nn blocks), truncated to the layers the features
need.

`text_encoder-mlx-4bit/` loads natively: its 4-bit g64 linears and embedding stay quantized
(nn.QuantizedLinear / QuantizedEmbedding, chosen by the checkpoint's `.scales` keys). Other repos (HQQ) come
dense through `bonsai.weights.read_text_encoder`. Written here rather than taken from mlx-lm: importing mlx-lm
imports transformers (0.8 s of a 2.7 s first image of a tiny repo in a new process on our CPU machine).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...config import Qwen3Fields, TextEncoderConfig, mlx_quantization, read_text_encoder_json
from ...layouts import TE_MLX
from ...errors import BonsaiValueError
from ...files import load_mlx
from ...state import check_finite
from ...weights import with_model_prefix

DEFAULT_LAYERS = TextEncoderConfig.feature_layers  # the dataclass default: klein's (9, 18, 27)
from . import mx_dtype, to_mx
from .loading import check_quantizable, load_strict

MLX_TE_DIR = TE_MLX.folder


class Attention(nn.Module):
    def __init__(self, c: Qwen3Fields):
        super().__init__()
        bias = bool(c.attention_bias)
        self.n_heads, self.n_kv_heads, self.scale = c.num_attention_heads, c.num_key_value_heads, c.head_dim**-0.5
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.k_norm = nn.RMSNorm(c.head_dim, eps=c.rms_norm_eps)
        self.rope = nn.RoPE(c.head_dim, traditional=False, base=c.theta)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, S, _ = x.shape
        # [B, S, heads * d] -> [B, heads, S, d]
        q = self.q_norm(self.q_proj(x).reshape(B, S, self.n_heads, -1)).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, S, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, S, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        out = mx.fast.scaled_dot_product_attention(self.rope(q), self.rope(k), v, scale=self.scale, mask=mask)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, c: Qwen3Fields):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen3Fields):
        super().__init__()
        self.self_attn = Attention(c)
        self.mlp = MLP(c)
        self.input_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(c.hidden_size, eps=c.rms_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.self_attn(self.input_layernorm(x), mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen3Body(nn.Module):
    """`model.*` of Qwen3ForCausalLM without the final norm: embed_tokens + the first n decoder layers."""

    def __init__(self, config: Qwen3Fields, n_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(n_layers)]


class Qwen3TextEncoder(nn.Module):
    """input_ids, attention_mask [B, S] -> hidden states after the requested decoder layers (1-based)."""

    def __init__(self, config: Qwen3Fields, n_layers: int):
        super().__init__()
        self.model = Qwen3Body(config, n_layers)

    def __call__(self, input_ids: mx.array, attention_mask: mx.array, layers=DEFAULT_LAYERS) -> list[mx.array]:
        if max(layers) > len(self.model.layers):
            raise ValueError(f"layers {tuple(layers)} need {max(layers)} decoder layers; {len(self.model.layers)} loaded")
        B, S = input_ids.shape
        # causal AND key padding, as transformers' Qwen3; positions stay arange(S) (pads keep their slots)
        causal = mx.tril(mx.ones((S, S), dtype=mx.bool_))
        mask = causal[None, None] & (attention_mask.astype(mx.bool_)[:, None, None, :])  # [B, 1, S, S]
        h = self.model.embed_tokens(input_ids)
        out = []
        for i, layer in enumerate(self.model.layers[: max(layers)], start=1):
            h = layer(h, mask)
            if i in layers:
                out.append(h)
        return [out[sorted(layers).index(k)] for k in layers]


def read_mlx_text_encoder(folder: str | Path, n_layers: int) -> tuple[dict, dict | None, dict[str, mx.array]]:
    """`text_encoder-mlx-4bit/` (or the repo root) -> (config, quantization, tensors of layers < n_layers)."""
    folder = Path(folder)
    if (folder / MLX_TE_DIR).is_dir():
        folder = folder / MLX_TE_DIR
    config, quant = read_text_encoder_json(folder / "config.json")
    file = folder / TE_MLX.weight_file
    tensors = {key: arr for key, arr in with_model_prefix(load_mlx(file)).items() if _keep(key, n_layers)}
    check_finite(file, tensors)
    if any(key.endswith(".scales") for key in tensors):
        mlx_quantization(quant, folder / "config.json")
    return config, quant, tensors


def _keep(key: str, n_layers: int) -> bool:
    if key.startswith("model.embed_tokens."):
        return True
    if key.startswith("model.layers."):
        index = key.split(".")[2]
        return not index.isdigit() or int(index) < n_layers  # a malformed key is kept for the strict check to name
    return False  # final norm, lm_head and layers past the last feature layer are never used


def load_text_encoder(config: Qwen3Fields | dict, tensors: dict, quantization: dict | None = None, layers=DEFAULT_LAYERS,
                      dtype="float16", source: str = "text encoder") -> Qwen3TextEncoder:
    """Build a Qwen3TextEncoder with max(layers) decoder layers; strict on the keys it needs.

    config: `Qwen3Fields` or a config.json dict (checked as one). tensors: `model.`-prefixed (or bare) keys -> mx/torch/numpy. Linears with `.scales` stay MLX-quantized.
    """
    dtype = mx_dtype(dtype)
    n = max(layers)
    tensors = {k: to_mx(v) for k, v in with_model_prefix(tensors).items() if _keep(k, n)}
    if not isinstance(config, Qwen3Fields):
        config = Qwen3Fields.from_dict(config, source)
    if n > config.num_hidden_layers:
        raise BonsaiValueError(f"{source}: layers {tuple(layers)} exceed num_hidden_layers={config.num_hidden_layers}")
    model = Qwen3TextEncoder(config, n)
    if any(k.endswith(".scales") for k in tensors):
        bits, group_size = mlx_quantization(quantization, f"{source}: config.json")
        check_quantizable(model, tensors, group_size, source)
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda path, m: f"{path}.scales" in tensors)
    # packed codes keep their integer dtype; everything else (scales included) runs in the compute dtype
    cast = {k: v if not mx.issubdtype(v.dtype, mx.floating) else v.astype(dtype) for k, v in tensors.items()}
    return load_strict(model, cast, source, "Qwen3 text-encoder weights")


def load_text_encoder_folder(folder: str | Path, layers=DEFAULT_LAYERS, dtype="float16") -> Qwen3TextEncoder:
    """Repo folder -> encoder: MLX 4-bit natively, anything else via bonsai.weights.read_text_encoder (dense)."""
    folder = Path(folder)
    n = max(layers)
    if (folder / MLX_TE_DIR).is_dir() or folder.name == MLX_TE_DIR:
        config, quant, tensors = read_mlx_text_encoder(folder, n)
        return load_text_encoder(config, tensors, quant, layers, dtype, source=str(folder))
    from ... import weights

    config, state = weights.read_text_encoder(folder, layers=n)
    return load_text_encoder(config, state, None, layers, dtype, source=str(folder))


def encode(model: Qwen3TextEncoder, input_ids, attention_mask, layers=DEFAULT_LAYERS) -> mx.array:
    """int64 [B, S] ids and mask (torch/numpy) -> features [B, S, len(layers) * hidden] = [h9 | h18 | h27]."""
    ids, mask = (to_mx(t).astype(mx.int32) for t in (input_ids, attention_mask))
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, S], got {ids.shape} and {mask.shape}")
    return mx.concatenate(model(ids, mask, layers), axis=-1)
