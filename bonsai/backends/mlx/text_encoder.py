"""Qwen3 text encoder in MLX (mlx-lm's Qwen3 blocks), truncated to the layers the features need.

`text_encoder-mlx-4bit/` loads natively: its 4-bit g64 linears and embedding stay quantized
(nn.QuantizedLinear / QuantizedEmbedding, chosen by the checkpoint's `.scales` keys). Other repos (HQQ) come
dense through `bonsai.weights.read_text_encoder`.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ...config import TextEncoderConfig, mlx_quantization, read_text_encoder_json
from ...layouts import TE_MLX
from ...errors import BonsaiValueError
from ...files import load_mlx
from ...state import check_finite
from ...weights import with_model_prefix

DEFAULT_LAYERS = TextEncoderConfig.feature_layers  # the dataclass default: klein's (9, 18, 27)
from . import mx_dtype, to_mx
from .loading import check_quantizable, load_strict

MLX_TE_DIR = TE_MLX.folder


def _qwen3():
    try:
        from mlx_lm.models import qwen3
    except ImportError:
        raise ImportError("the MLX text encoder needs mlx-lm: pip install mlx-lm") from None
    return qwen3


class Qwen3Body(nn.Module):
    """`model.*` of Qwen3ForCausalLM without the final norm: embed_tokens + the first n decoder layers."""

    def __init__(self, args, n_layers: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [_qwen3().TransformerBlock(args) for _ in range(n_layers)]


class Qwen3TextEncoder(nn.Module):
    """input_ids, attention_mask [B, S] -> hidden states after the requested decoder layers (1-based)."""

    def __init__(self, args, n_layers: int):
        super().__init__()
        self.args = args
        self.model = Qwen3Body(args, n_layers)

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


def model_args(config: dict, source="text encoder config"):
    """transformers Qwen3 config dict -> mlx-lm ModelArgs."""
    config = {"model_type": "qwen3", "tie_word_embeddings": True, "max_position_embeddings": 40960, **config}
    if "head_dim" not in config:
        config["head_dim"] = config["hidden_size"] // config["num_attention_heads"]
    try:
        return _qwen3().ModelArgs.from_dict(config)
    except (TypeError, KeyError, ValueError) as e:
        raise BonsaiValueError(f"{source}: not a Qwen3 config for mlx-lm ({type(e).__name__}: {e})") from None


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


def load_text_encoder(config: dict, tensors: dict, quantization: dict | None = None, layers=DEFAULT_LAYERS,
                      dtype="float16", source: str = "text encoder") -> Qwen3TextEncoder:
    """Build a Qwen3TextEncoder with max(layers) decoder layers; strict on the keys it needs.

    tensors: `model.`-prefixed (or bare) keys -> mx/torch/numpy. Linears with `.scales` stay MLX-quantized.
    """
    dtype = mx_dtype(dtype)
    n = max(layers)
    tensors = {k: to_mx(v) for k, v in with_model_prefix(tensors).items() if _keep(k, n)}
    args = model_args(config, source)
    if n > args.num_hidden_layers:
        raise BonsaiValueError(f"{source}: layers {tuple(layers)} exceed num_hidden_layers={args.num_hidden_layers}")
    model = Qwen3TextEncoder(args, n)
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
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return load_text_encoder(config, state, None, layers, dtype, source=str(folder))


def encode(model: Qwen3TextEncoder, input_ids, attention_mask, layers=DEFAULT_LAYERS) -> mx.array:
    """int64 [B, S] ids and mask (torch/numpy) -> features [B, S, len(layers) * hidden] = [h9 | h18 | h27]."""
    ids, mask = (to_mx(t).astype(mx.int32) for t in (input_ids, attention_mask))
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"input_ids and attention_mask must both be [B, S], got {ids.shape} and {mask.shape}")
    return mx.concatenate(model(ids, mask, layers), axis=-1)
