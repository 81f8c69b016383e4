"""FLUX.2 [klein] transformer in MLX. Classes and attribute names mirror the torch reference (diffusers keys).

The 100 big linears become stock `nn.QuantizedLinear`s (`nn.quantize`, chosen by the checkpoint's `.scales` keys)
over the MLX affine tensors (ternary: bits 2, bias = -scale; binary: bits 1, scale 2s, bias -s; group 128),
loaded as released.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ...config import TransformerConfig
from ...layouts import MLX, Kind
from ...files import load_mlx
from ...state import check_finite
from ...latents import rope_tables
from ...quant.lowbit import LowBitWeight, check_mlx_affine
from . import mx_dtype, to_mx
from .loading import check_quantizable, load_strict, to_numpy

FP16_MAX = 65504.0

PACKED_DIR = MLX.folder(Kind.TERNARY)  # the same folder for both kinds


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


# --- small functions --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: mx.array, dim: int, max_period: float = 10000.0) -> mx.array:
    """t [B] -> [B, dim] float32 = [cos(t f), sin(t f)], f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = mx.exp(-math.log(max_period) * mx.arange(half, dtype=mx.float32) / half)
    angles = t.astype(mx.float32)[:, None] * freqs[None]  # [B, half]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


def modulate(x: mx.array, shift: mx.array, scale: mx.array, eps: float) -> mx.array:
    """Affine-free LayerNorm (mx.fast), then per-sample (1 + scale) and shift [B, 1, D]."""
    return (1 + scale) * mx.fast.layer_norm(x, None, None, eps) + shift


def split_mod(mod: mx.array, n: int) -> list[mx.array]:
    """[B, n*D] -> n chunks [B, 1, D]."""
    return mx.split(mod[:, None], n, axis=-1)


def apply_rope(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Rotate pairs (2j, 2j+1) of x [B, H, N, d] by cos/sin [N, d] (each angle repeated twice), in fp32.

    mx.fast.rope takes one sequential position per token; klein's 4-axis ids need explicit tables.
    """
    B, H, N, d = x.shape
    xf = x.astype(mx.float32).reshape(B, H, N, d // 2, 2)  # [B, H, N, d/2, (even, odd)]
    c, s = cos[:, 0::2], sin[:, 0::2]  # [N, d/2]
    x0, x1 = xf[..., 0], xf[..., 1]
    out = mx.stack([x0 * c - x1 * s, x1 * c + x0 * s], axis=-1)
    return out.reshape(B, H, N, d).astype(x.dtype)


def attention(q: mx.array, k: mx.array, v: mx.array, rope: tuple[mx.array, mx.array]) -> mx.array:
    """q, k, v [B, N, H, d] (already QK-normed) -> [B, N, H*d]; full non-causal attention, no mask."""
    B, N, H, d = q.shape
    q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, H, N, d]
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = mx.fast.scaled_dot_product_attention(q, k, v, scale=d**-0.5)
    return out.transpose(0, 2, 1, 3).reshape(B, N, H * d)


def swiglu(x: mx.array) -> mx.array:
    """[..., 2F] -> [..., F]; the first half is the SiLU gate."""
    gate, value = mx.split(x, 2, axis=-1)
    return nn.silu(gate) * value


def clip_fp16(x: mx.array) -> mx.array:
    return mx.clip(x, -FP16_MAX, FP16_MAX) if x.dtype == mx.float16 else x


def _heads(x: mx.array, head_dim: int) -> mx.array:
    return x.reshape(*x.shape[:-1], -1, head_dim)  # [B, N, D] -> [B, N, H, d]


# --- modules ----------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = _linear(channels, dim)
        self.linear_2 = _linear(dim, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_2(nn.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    """klein has no guidance embedder; only the timestep branch exists."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, dim)

    def __call__(self, timestep: mx.array) -> mx.array:
        """timestep [B] (already x1000, model dtype) -> temb [B, D]."""
        return self.timestep_embedder(timestep_sinusoid(timestep, self.channels).astype(timestep.dtype))


class Modulation(nn.Module):
    """SiLU(temb) -> n_sets * (shift, scale, gate); computed once per forward and shared by all blocks."""

    def __init__(self, dim: int, n_sets: int):
        super().__init__()
        self.linear = _linear(dim, 3 * n_sets * dim)

    def __call__(self, temb: mx.array) -> mx.array:
        return self.linear(nn.silu(temb))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_in = _linear(dim, 2 * hidden)
        self.linear_out = _linear(hidden, dim)

    def __call__(self, x: mx.array) -> mx.array:
        return self.linear_out(swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """Attention over [text; image] with separate projections per stream (the double-stream block's attention)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = _linear(dim, inner), _linear(dim, inner), _linear(dim, inner)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = [_linear(inner, dim)]  # key "to_out.0" (diffusers keeps a dropout at [1])
        self.add_q_proj, self.add_k_proj, self.add_v_proj = _linear(dim, inner), _linear(dim, inner), _linear(dim, inner)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = _linear(inner, dim)

    def __call__(self, x: mx.array, c: mx.array, rope) -> tuple[mx.array, mx.array]:
        """x [B, N_img, D], c [B, N_txt, D] -> (image out, text out)."""
        d = self.head_dim
        q = mx.concatenate([self.norm_added_q(_heads(self.add_q_proj(c), d)), self.norm_q(_heads(self.to_q(x), d))], 1)
        k = mx.concatenate([self.norm_added_k(_heads(self.add_k_proj(c), d)), self.norm_k(_heads(self.to_k(x), d))], 1)
        v = mx.concatenate([_heads(self.add_v_proj(c), d), _heads(self.to_v(x), d)], axis=1)
        out = attention(q, k, v, rope)
        n_txt = c.shape[1]
        return self.to_out[0](out[:, n_txt:]), self.to_add_out(out[:, :n_txt])


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text streams with their own weights, one joint attention."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = JointAttention(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps)
        self.ff = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim)
        self.ff_context = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim)

    def __call__(self, x, c, mod_img, mod_txt, rope):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = split_mod(mod_img, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = split_mod(mod_txt, 6)
        attn_x, attn_c = self.attn(
            modulate(x, shift_msa, scale_msa, self.eps), modulate(c, c_shift_msa, c_scale_msa, self.eps), rope
        )
        x = x + gate_msa * attn_x
        x = x + gate_mlp * self.ff(modulate(x, shift_mlp, scale_mlp, self.eps))
        c = c + c_gate_msa * attn_c
        c = c + c_gate_mlp * self.ff_context(modulate(c, c_shift_mlp, c_scale_mlp, self.eps))
        return x, clip_fp16(c)


class ParallelSelfAttention(nn.Module):
    """ViT-22B style: one input projection for q, k, v and the MLP, one output projection for both."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float):
        super().__init__()
        self.head_dim, self.inner = head_dim, heads * head_dim
        self.to_qkv_mlp_proj = _linear(dim, 3 * self.inner + 2 * mlp_hidden)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = _linear(self.inner + mlp_hidden, dim)

    def __call__(self, h: mx.array, rope) -> mx.array:
        proj = self.to_qkv_mlp_proj(h)
        q, k, v, mlp = mx.split(proj, [self.inner, 2 * self.inner, 3 * self.inner], axis=-1)
        d = self.head_dim
        out = attention(self.norm_q(_heads(q, d)), self.norm_k(_heads(k, d)), _heads(v, d), rope)
        return self.to_out(mx.concatenate([out, swiglu(mlp)], axis=-1))


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.eps = cfg.eps
        self.attn = ParallelSelfAttention(
            cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_hidden_dim, cfg.eps
        )

    def __call__(self, h, mod, rope):
        shift, scale, gate = split_mod(mod, 3)
        return clip_fp16(h + gate * self.attn(modulate(h, shift, scale, self.eps), rope))


class NormOut(nn.Module):
    """Final adaptive LayerNorm; the projection yields [scale | shift] (diffusers order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.linear = _linear(dim, 2 * dim)

    def __call__(self, x: mx.array, temb: mx.array) -> mx.array:
        scale, shift = split_mod(self.linear(nn.silu(temb).astype(x.dtype)), 2)
        return modulate(x, shift, scale, self.eps)


class Flux2Transformer(nn.Module):
    """Velocity model. __call__(x [B, N_img, in], context [B, N_txt, joint], sigma [B], img_ids, txt_ids)."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.x_embedder = _linear(cfg.in_channels, dim)
        self.context_embedder = _linear(cfg.joint_attention_dim, dim)
        self.time_guidance_embed = TimeGuidanceEmbed(cfg.timestep_guidance_channels, dim)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.transformer_blocks = [DoubleStreamBlock(cfg) for _ in range(cfg.num_layers)]
        self.single_transformer_blocks = [SingleStreamBlock(cfg) for _ in range(cfg.num_single_layers)]
        self.norm_out = NormOut(dim, cfg.eps)
        self.proj_out = _linear(dim, cfg.out_dim)

    def rope(self, img_ids, txt_ids) -> tuple[mx.array, mx.array]:
        """(cos, sin) float32 [N_txt + N_img, head_dim], text first like the sequence (shared bonsai.latents tables)."""
        ids = [np.asarray(t.cpu() if hasattr(t, "cpu") else t) for t in (txt_ids, img_ids)]
        ids = np.concatenate([t[0] if t.ndim == 3 else t for t in ids])
        cos, sin = rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)
        return mx.array(cos), mx.array(sin)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None,
                 rope=None) -> mx.array:
        """rope: precomputed `self.rope(img_ids, txt_ids)`, reused across denoising steps."""
        x, c = hidden_states, encoder_hidden_states
        # The pipeline passes sigma; the model embeds sigma * 1000, rounded to the model dtype first.
        temb = self.time_guidance_embed(timestep.astype(x.dtype) * 1000)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x, c = self.x_embedder(x), self.context_embedder(c)
        rope = rope if rope is not None else self.rope(img_ids, txt_ids)
        for block in self.transformer_blocks:
            x, c = block(x, c, mod_img, mod_txt, rope)

        h = mx.concatenate([c, x], axis=1)  # [B, N_txt + N_img, D]
        for block in self.single_transformer_blocks:
            h = block(h, mod_single, rope)
        x = h[:, c.shape[1]:]
        return self.proj_out(self.norm_out(x, temb))


# --- loading ---------------------------------------------------------------------------------------------------


def linear_shapes(model: Flux2Transformer) -> dict[str, tuple[int, int]]:
    """Every Linear of the model by key prefix -> (out, in)."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def read_packed_mflux(folder: str | Path) -> tuple[TransformerConfig, int, int, dict[str, mx.array]]:
    """`transformer-packed-mflux/` (or the repo root holding it) -> (config, bits, group_size, mx tensors).

    mx.load maps the safetensors without repacking; the low-bit tensors keep their released bytes.
    """
    folder = Path(folder)
    if (folder / PACKED_DIR).is_dir():
        folder = folder / PACKED_DIR
    config = TransformerConfig.from_json(folder / "config.json")
    kind, q = MLX.read_quant(folder)
    bits, group = kind.bits, q["group_size"]
    path = folder / MLX.weight_file
    weights = load_mlx(path)
    check_finite(path, weights)
    return config, bits, group, weights


def mlx_tensors(tensors: dict) -> tuple[int | None, dict[str, mx.array]]:
    """weights.read_transformer(...).tensors (LowBitWeight | torch.Tensor) -> (bits, MLX-layout tensors)."""
    out, bits = {}, None
    for key, t in tensors.items():
        if isinstance(t, LowBitWeight):
            prefix = key[: -len(".weight")] if key.endswith(".weight") else key
            for name, arr in t.to_mlx().items():
                out[f"{prefix}.{name}"] = to_mx(arr)
            bits = t.bits
        else:
            out[key] = to_mx(t)
    return bits, out


def load_transformer(weights: dict[str, mx.array], config: TransformerConfig, bits: int | None,
                     group_size: int = 128, dtype="float16", dense: bool = False,
                     source: str = "transformer") -> Flux2Transformer:
    """Strictly load MLX-layout tensors into a Flux2Transformer.

    Linears whose key has `.scales` become nn.QuantizedLinear (the checkpoint decides) with their released uint32
    codes; with dense=True they are dequantized to plain weights instead (the benchmark's dense baseline).
    """
    dtype = mx_dtype(dtype)
    model = Flux2Transformer(config)
    quantized = [p for p in linear_shapes(model) if f"{p}.scales" in weights]
    params, codes = dict(weights), {}
    for prefix in quantized:
        keys = [f"{prefix}.{n}" for n in ("weight", "scales", "biases")]
        if not all(k in weights for k in keys):
            continue  # the strict load below names the missing part
        w, s, b = (weights[k] for k in keys)
        check_mlx_affine(to_numpy(w), to_numpy(s), to_numpy(b), bits, group_size, f"{source}: {prefix}")
        if dense:
            del params[keys[1]], params[keys[2]]
            params[keys[0]] = mx.dequantize(w, s, b, group_size=group_size, bits=bits)
        else:
            codes[keys[0]] = params.pop(keys[0])  # the released uint32 codes, unchanged
    if not dense:
        check_quantizable(model, weights, group_size, source)
        nn.quantize(model, group_size=group_size, bits=bits,
                    class_predicate=lambda path, _: f"{path}.scales" in weights)
    # everything but the codes, scales and biases included, runs in the compute dtype
    params = {**{k: v.astype(dtype) for k, v in params.items()}, **codes}
    return load_strict(model, params, source, "transformer weights")


def load_transformer_folder(folder: str | Path, dtype="float16", dense: bool = False) -> tuple[Flux2Transformer, str]:
    """Repo folder -> (model, kind). MLX repos load natively; gemlite/unpacked/compact go through bonsai.weights."""
    folder = Path(folder)
    if (folder / PACKED_DIR).is_dir() or folder.name == PACKED_DIR:
        config, bits, group, weights = read_packed_mflux(folder)
        source = str((folder if folder.name == PACKED_DIR else folder / PACKED_DIR) / MLX.weight_file)
    else:
        from ... import weights as bonsai_weights

        tw = bonsai_weights.read_transformer(folder)
        config, group, source = tw.config, 128, str(folder)
        bits, weights = mlx_tensors(tw.tensors)
        del tw
    model = load_transformer(weights, config, bits, group, dtype=dtype, dense=dense, source=source)
    return model, "dense" if bits is None else Kind.from_bits(bits, source)
