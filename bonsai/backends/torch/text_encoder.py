"""The Qwen3 text encoder in plain torch, cut to the layers the features need.

The arithmetic is transformers' Qwen3Model (sdpa attention), which the tests compare against: RMSNorm in float32
cast back before the weight, default RoPE (inv_freq in float32 on the CPU, cos/sin cast to the activations'
dtype, rotate_half), grouped-query attention with the causal AND key-padding mask, positions arange(S) (pads keep
their slots), SiLU-gated MLP. Attribute names are the checkpoint's `model.*` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import Qwen3Fields, TextEncoderConfig
from ...errors import BonsaiValueError
from ...prompt import stack_features
from ...state import check_state
from .linear import project

FEATURE_LAYERS = TextEncoderConfig.feature_layers  # the dataclass default: klein's (9, 18, 27)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def add_rms_norm(norm: RMSNorm, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the RMSNorm after it -> (x + y, norm(x + y))."""
    s = x + y
    return s, norm(s)


def norm_rope(norm: RMSNorm, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, n_rep: int) -> torch.Tensor:
    """The QK RMSNorm of x [B, S, H, d] and rotate_half RoPE (cos, sin [S, d]), each head repeated n_rep times
    for grouped-query attention -> [B, H * n_rep, S, d]."""
    y = norm(x).transpose(1, 2)
    y = y * cos + rotate_half(y) * sin
    return y if n_rep == 1 else y.repeat_interleave(n_rep, dim=1)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


@dataclass(frozen=True)
class TextOps:
    """The elementwise steps a backend may run as other code of the same math (CUDA: Triton kernels)."""

    rms_norm: Callable = rms_norm
    add_rms_norm: Callable = add_rms_norm
    norm_rope: Callable = norm_rope
    silu_mul: Callable = silu_mul


TORCH_TEXT_OPS = TextOps()


def rope_inv_freq(config: Qwen3Fields) -> torch.Tensor:
    """[head_dim / 2] float32, computed on the CPU as transformers does."""
    d = config.head_dim
    return 1.0 / (config.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c: Qwen3Fields, ops: TextOps = TORCH_TEXT_OPS):
        super().__init__()
        bias = bool(c.attention_bias)
        self.head_dim, self.n_rep, self.ops = c.head_dim, c.num_attention_heads // c.num_key_value_heads, ops
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        shape = (B, S, -1, self.head_dim)  # -> [B, heads, S, head_dim] after the transpose
        # with a mask, transformers repeats the kv heads rather than use SDPA's enable_gqa (CUDA's math fallback)
        q, k, v = project(x, (self.q_proj, self.k_proj, self.v_proj))
        q = self.ops.norm_rope(self.q_norm, q.view(shape), cos, sin, 1)
        k = self.ops.norm_rope(self.k_norm, k.view(shape), cos, sin, self.n_rep)
        v = v.view(shape).transpose(1, 2).repeat_interleave(self.n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


class MLP(nn.Module):
    def __init__(self, c: Qwen3Fields, ops: TextOps = TORCH_TEXT_OPS):
        super().__init__()
        self.ops = ops
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_mul(*project(x, (self.gate_proj, self.up_proj))))


class DecoderLayer(nn.Module):
    def __init__(self, c: Qwen3Fields, ops: TextOps = TORCH_TEXT_OPS):
        super().__init__()
        self.ops = ops
        self.self_attn = Attention(c, ops)
        self.mlp = MLP(c, ops)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        attn = self.self_attn(self.ops.rms_norm(self.input_layernorm, x), cos, sin, mask)
        x, h = self.ops.add_rms_norm(self.post_attention_layernorm, x, attn)
        return x + self.mlp(h)


class Qwen3TextEncoder(nn.Module):
    """`model.*` of Qwen3ForCausalLM without the final norm: embed_tokens + the first n decoder layers. ops: the
    elementwise steps (`TextOps`)."""

    def __init__(self, config: Qwen3Fields, n_layers: int, device=None, ops: TextOps = TORCH_TEXT_OPS):
        super().__init__()
        self.config = config
        # a given weight skips the random init: normal_ on meta tensors imports torch._dynamo (seconds in a new
        # process: 0.9 s on our CPU machine, more on the H200 host)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, ops) for _ in range(n_layers))
        self.register_buffer("inv_freq", rope_inv_freq(config).to(device or "cpu"), persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, layers=FEATURE_LAYERS) -> dict:
        """-> {i: the output of decoder layer i (1-based; 0: the embeddings)} for i in layers."""
        if max(layers) > len(self.layers):
            raise BonsaiValueError(f"layers {tuple(layers)} need {max(layers)} decoder layers; {len(self.layers)} "
                                   "loaded")
        S = input_ids.shape[1]
        h = self.embed_tokens(input_ids)
        freqs = torch.arange(S, device=h.device, dtype=torch.float32)[:, None] * self.inv_freq.float()  # [S, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(h.dtype), emb.sin().to(h.dtype)
        causal = torch.ones(S, S, dtype=torch.bool, device=h.device).tril()
        mask = causal & attention_mask.bool()[:, None, None, :]  # [B, 1, S, S]: True attends
        out = {0: h} if 0 in layers else {}
        for i, layer in enumerate(self.layers[: max(layers)], start=1):
            h = layer(h, cos, sin, mask)
            if i in layers:
                out[i] = h
        return out


def load_text_encoder(config, state: dict, device="cpu", dtype: torch.dtype = torch.float32, layers=FEATURE_LAYERS,
                      make_linear=None, source="text encoder", ops: TextOps = TORCH_TEXT_OPS) -> Qwen3TextEncoder:
    """A Qwen3TextEncoder with decoder layers [0, max(layers)) from a Qwen3ForCausalLM state dict.

    config: `Qwen3Fields` (as `bonsai.weights.read_text_encoder` returns it), a config.json dict, or an object
    with `to_dict()` (a transformers Qwen3Config). Values that are not tensors (packed `Int4Weight` linears)
    become `make_linear(weight, device=, dtype=)`. ops: the elementwise steps (`TextOps`). Strict
    (`bonsai.state.check_state`, naming `source`, the file the state came from).
    """
    if not isinstance(config, Qwen3Fields):
        config = Qwen3Fields.from_dict(config if isinstance(config, dict) else config.to_dict(), source)
    n = max(layers)
    if config.num_hidden_layers < n:
        raise BonsaiValueError(f"{source}: text encoder has {config.num_hidden_layers} layers, features need {n}")
    with torch.device("meta"):
        model = Qwen3TextEncoder(config.first_layers(n), n, device=device, ops=ops)
    prefix = "model."
    wanted = {k.removeprefix(prefix): v for k, v in state.items()
              if k.startswith(prefix) and not (k.startswith("model.layers.") and int(k.split(".")[2]) >= n)
              and k != "model.norm.weight"}  # the features are the raw layer outputs: no final norm
    check_state(source, {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in wanted.items()})
    packed = {k: v for k, v in wanted.items() if not isinstance(v, torch.Tensor)}
    if packed and make_linear is None:
        raise BonsaiValueError(f"{source}: packed linears ({next(iter(packed))}, ...) but no make_linear")
    for key, weight in packed.items():
        parent, _, name = key.removesuffix(".weight").rpartition(".")
        if not key.endswith(".weight") or not isinstance(getattr(model.get_submodule(parent), name), nn.Linear):
            raise BonsaiValueError(f"{source}: packed weight {key} is not a linear's weight")
        setattr(model.get_submodule(parent), name, make_linear(weight, device=device, dtype=dtype))
    dense = {k: v.to(device=device, dtype=dtype) for k, v in wanted.items() if k not in packed}
    result = model.load_state_dict(dense, strict=False, assign=True)
    replaced = tuple(k.removesuffix("weight") for k in packed)
    if result.unexpected_keys or any(not k.startswith(replaced) for k in result.missing_keys):
        raise BonsaiValueError(f"{source}: state dict did not load: {result}")
    return model.eval().requires_grad_(False)


@torch.inference_mode()
def encode(model: Qwen3TextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
           layers=FEATURE_LAYERS) -> torch.Tensor:
    """int64 [B, S] ids and mask -> features [B, S, len(layers) * hidden]."""
    return stack_features(model(input_ids, attention_mask, layers), layers)
