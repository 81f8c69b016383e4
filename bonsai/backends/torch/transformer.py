"""FLUX.2 [klein] transformer in plain torch. Attribute names are the diffusers checkpoint keys.

Numerics follow diffusers' Flux2Transformer2DModel: the timestep sinusoid and RoPE run in fp32, the QK RMSNorm
and everything else in the model dtype, and fp16 residual streams are clipped to the fp16 range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TransformerConfig
from ...errors import BonsaiValueError
from ...latents import rope_tables
from ...state import check_state, few
from .linear import LowBitLinear, project

FP16_MAX = 65504.0


# --- small functions --------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t [B] -> [B, dim] float32 = [cos(t f), sin(t f)], f_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # [B, half]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm, then per-sample (1 + scale) and shift [B, 1, D]."""
    return torch.addcmul(shift, F.layer_norm(x, x.shape[-1:], eps=eps), 1 + scale)


def split_mod(mod: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """[B, n*D] -> n chunks [B, 1, D]."""
    return mod.unsqueeze(1).chunk(n, dim=-1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2j, 2j+1) of x [B, H, N, d] by the angles of freqs complex64 [N, d/2], in fp32.

    Complex multiplication is the pair rotation (x0 cos - x1 sin, x1 cos + x0 sin) in one kernel.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # [B, H, N, d/2]
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


def norm_rope(parts, eps: float, freqs: torch.Tensor) -> torch.Tensor:
    """parts: (x [B, N_i, H, d], RMSNorm weight [d]) in sequence order -> the normed parts joined along N and
    rotated by RoPE (freqs complex64 [sum N_i, d/2]): [B, H, sum N_i, d]."""
    normed = [F.rms_norm(x, x.shape[-1:], weight, eps) for x, weight in parts]
    x = normed[0] if len(normed) == 1 else torch.cat(normed, dim=1)
    return apply_rope(x.transpose(1, 2), freqs)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q, k [B, H, N, d] (normed, rotated), v [B, N, H, d] -> [B, N, H*d]; full non-causal attention, no mask."""
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """[..., 2F] -> [..., F]; the first half is the SiLU gate."""
    gate, value = x.chunk(2, dim=-1)
    return F.silu(gate) * value


def join_swiglu(attn: torch.Tensor, mlp: torch.Tensor) -> torch.Tensor:
    """The single block's output-projection input: [attn | swiglu(mlp)] along the last dim."""
    return torch.cat([attn, swiglu(mlp)], dim=-1)


def gated_add(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, clip: bool = False) -> torch.Tensor:
    """The gated residual x + gate * y (gate [B, 1, D]); clip: then clipped to the fp16 range, as diffusers clips
    the text and single streams."""
    out = torch.addcmul(x, gate, y)
    return clip_fp16(out) if clip else out


@dataclass(frozen=True)
class Ops:
    """The elementwise steps a backend may run as other code of the same math (CUDA: Triton kernels, or
    torch.compile'd)."""

    modulate: Callable = modulate
    norm_rope: Callable = norm_rope
    attention: Callable = attention
    swiglu: Callable = swiglu
    join_swiglu: Callable = join_swiglu
    gated_add: Callable = gated_add


TORCH_OPS = Ops()


def clip_fp16(x: torch.Tensor) -> torch.Tensor:
    return x.clip(-FP16_MAX, FP16_MAX) if x.dtype == torch.float16 else x


def _linear(d_in: int, d_out: int) -> nn.Linear:
    return nn.Linear(d_in, d_out, bias=False)


# --- modules ----------------------------------------------------------------------------------------------------


class TimestepEmbedder(nn.Module):
    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.linear_1 = _linear(channels, dim)
        self.linear_2 = _linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class TimeGuidanceEmbed(nn.Module):
    """klein has no guidance embedder; only the timestep branch exists."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels = channels
        self.timestep_embedder = TimestepEmbedder(channels, dim)

    def forward(self, timestep: torch.Tensor) -> torch.Tensor:
        """timestep [B] (already x1000, model dtype) -> temb [B, D]."""
        return self.timestep_embedder(timestep_sinusoid(timestep, self.channels).to(timestep.dtype))


class Modulation(nn.Module):
    """SiLU(temb) -> n_sets * (shift, scale, gate); computed once per forward and shared by all blocks."""

    def __init__(self, dim: int, n_sets: int):
        super().__init__()
        self.linear = _linear(dim, 3 * n_sets * dim)

    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        return self.linear(F.silu(temb))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, ops: Ops = TORCH_OPS):
        super().__init__()
        self.ops = ops
        self.linear_in = _linear(dim, 2 * hidden)
        self.linear_out = _linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_out(self.ops.swiglu(self.linear_in(x)))


class JointAttention(nn.Module):
    """Attention over [text; image] with separate projections per stream (the double-stream block's attention)."""

    def __init__(self, dim: int, heads: int, head_dim: int, eps: float, ops: Ops = TORCH_OPS):
        super().__init__()
        self.heads, self.head_dim, self.ops = heads, head_dim, ops
        inner = heads * head_dim
        self.to_q, self.to_k, self.to_v = _linear(dim, inner), _linear(dim, inner), _linear(dim, inner)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = nn.ModuleList([_linear(inner, dim)])  # key "to_out.0" (diffusers keeps a dropout at [1])
        self.add_q_proj, self.add_k_proj, self.add_v_proj = _linear(dim, inner), _linear(dim, inner), _linear(dim, inner)
        self.norm_added_q, self.norm_added_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_add_out = _linear(inner, dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, N_img, D], c [B, N_txt, D] -> (image out, text out)."""
        heads = lambda t: t.unflatten(-1, (-1, self.head_dim))  # [B, N, D] -> [B, N, H, d]  # noqa: E731
        eps = self.norm_q.eps
        qc, kc, vc = project(c, (self.add_q_proj, self.add_k_proj, self.add_v_proj))
        qx, kx, vx = project(x, (self.to_q, self.to_k, self.to_v))
        q = self.ops.norm_rope(((heads(qc), self.norm_added_q.weight), (heads(qx), self.norm_q.weight)), eps,
                               rope)  # [B, H, N, d], text first
        k = self.ops.norm_rope(((heads(kc), self.norm_added_k.weight), (heads(kx), self.norm_k.weight)), eps, rope)
        v = torch.cat([heads(vc), heads(vx)], dim=1)
        out = self.ops.attention(q, k, v)
        out_c, out_x = out.split([c.shape[1], x.shape[1]], dim=1)
        return self.to_out[0](out_x), self.to_add_out(out_c)


class DoubleStreamBlock(nn.Module):
    """MMDiT block: image and text streams with their own weights, one joint attention."""

    def __init__(self, cfg: TransformerConfig, ops: Ops = TORCH_OPS):
        super().__init__()
        self.eps, self.ops = cfg.eps, ops
        self.attn = JointAttention(cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps, ops)
        self.ff = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim, ops)
        self.ff_context = FeedForward(cfg.inner_dim, cfg.mlp_hidden_dim, ops)

    def forward(self, x, c, mod_img, mod_txt, rope):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = split_mod(mod_img, 6)
        c_shift_msa, c_scale_msa, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = split_mod(mod_txt, 6)
        mod, add = self.ops.modulate, self.ops.gated_add
        attn_x, attn_c = self.attn(mod(x, shift_msa, scale_msa, self.eps), mod(c, c_shift_msa, c_scale_msa, self.eps),
                                   rope)
        x = add(x, gate_msa, attn_x)
        x = add(x, gate_mlp, self.ff(mod(x, shift_mlp, scale_mlp, self.eps)))
        c = add(c, c_gate_msa, attn_c)
        c = add(c, c_gate_mlp, self.ff_context(mod(c, c_shift_mlp, c_scale_mlp, self.eps)), clip=True)
        return x, c


class ParallelSelfAttention(nn.Module):
    """ViT-22B style: one input projection for q, k, v and the MLP, one output projection for both."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_hidden: int, eps: float, ops: Ops = TORCH_OPS):
        super().__init__()
        self.head_dim, self.inner, self.ops = head_dim, heads * head_dim, ops
        self.to_qkv_mlp_proj = _linear(dim, 3 * self.inner + 2 * mlp_hidden)
        self.norm_q, self.norm_k = nn.RMSNorm(head_dim, eps=eps), nn.RMSNorm(head_dim, eps=eps)
        self.to_out = _linear(self.inner + mlp_hidden, dim)

    def forward(self, h: torch.Tensor, rope) -> torch.Tensor:
        proj = self.to_qkv_mlp_proj(h)
        qkv, mlp = proj.split([3 * self.inner, proj.shape[-1] - 3 * self.inner], dim=-1)
        q, k, v = (t.unflatten(-1, (-1, self.head_dim)) for t in qkv.chunk(3, dim=-1))  # [B, N, H, d]
        eps = self.norm_q.eps
        out = self.ops.attention(self.ops.norm_rope(((q, self.norm_q.weight),), eps, rope),
                                 self.ops.norm_rope(((k, self.norm_k.weight),), eps, rope), v)
        return self.to_out(self.ops.join_swiglu(out, mlp))


class SingleStreamBlock(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops: Ops = TORCH_OPS):
        super().__init__()
        self.eps, self.ops = cfg.eps, ops
        self.attn = ParallelSelfAttention(
            cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim, cfg.mlp_hidden_dim, cfg.eps, ops
        )

    def forward(self, h, mod, rope):
        shift, scale, gate = split_mod(mod, 3)
        return self.ops.gated_add(h, gate, self.attn(self.ops.modulate(h, shift, scale, self.eps), rope), clip=True)


class NormOut(nn.Module):
    """Final adaptive LayerNorm; the projection yields [scale | shift] (diffusers order)."""

    def __init__(self, dim: int, eps: float, ops: Ops = TORCH_OPS):
        super().__init__()
        self.eps, self.ops = eps, ops
        self.linear = _linear(dim, 2 * dim)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        scale, shift = split_mod(self.linear(F.silu(temb).to(x.dtype)), 2)
        return self.ops.modulate(x, shift, scale, self.eps)


class Flux2Transformer(nn.Module):
    """Velocity model. forward(x [B, N_img, in], context [B, N_txt, joint], sigma [B], img_ids, txt_ids)."""

    def __init__(self, cfg: TransformerConfig, ops: Ops = TORCH_OPS):
        super().__init__()
        self.config = cfg
        dim = cfg.inner_dim
        self.x_embedder = _linear(cfg.in_channels, dim)
        self.context_embedder = _linear(cfg.joint_attention_dim, dim)
        self.time_guidance_embed = TimeGuidanceEmbed(cfg.timestep_guidance_channels, dim)
        self.double_stream_modulation_img = Modulation(dim, 2)
        self.double_stream_modulation_txt = Modulation(dim, 2)
        self.single_stream_modulation = Modulation(dim, 1)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg, ops) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList([SingleStreamBlock(cfg, ops)
                                                        for _ in range(cfg.num_single_layers)])
        self.norm_out = NormOut(dim, cfg.eps, ops)
        self.proj_out = _linear(dim, cfg.out_dim)

    def rope(self, img_ids: torch.Tensor, txt_ids: torch.Tensor, device) -> torch.Tensor:
        """Rotation angles as complex64 [N_txt + N_img, head_dim / 2], text first like the sequence."""
        ids = torch.cat([txt_ids[0] if txt_ids.ndim == 3 else txt_ids, img_ids[0] if img_ids.ndim == 3 else img_ids])
        cos, sin = rope_tables(ids, self.config.axes_dims_rope, self.config.rope_theta)  # [N, d], pairs repeated
        return torch.complex(cos[:, ::2], sin[:, ::2]).to(device)

    def forward(self, hidden_states, encoder_hidden_states, timestep, img_ids=None, txt_ids=None,
                rope=None) -> torch.Tensor:
        """rope: precomputed `self.rope(img_ids, txt_ids, device)`, reused across steps (and by graph captures)."""
        x, c = hidden_states, encoder_hidden_states
        # The pipeline passes sigma; the model embeds sigma * 1000, rounded to the model dtype first.
        temb = self.time_guidance_embed(timestep.to(x.dtype) * 1000)
        mod_img = self.double_stream_modulation_img(temb)
        mod_txt = self.double_stream_modulation_txt(temb)
        mod_single = self.single_stream_modulation(temb)

        x, c = self.x_embedder(x), self.context_embedder(c)
        rope = self.rope(img_ids, txt_ids, x.device) if rope is None else rope
        for block in self.transformer_blocks:
            x, c = block(x, c, mod_img, mod_txt, rope)

        h = torch.cat([c, x], dim=1)  # [B, N_txt + N_img, D]
        for block in self.single_transformer_blocks:
            h = block(h, mod_single, rope)
        x = h[:, c.shape[1]:]
        return self.proj_out(self.norm_out(x, temb))


# --- loading ----------------------------------------------------------------------------------------------------


def _is_lowbit(v) -> bool:
    return not isinstance(v, torch.Tensor) and hasattr(v, "packed") and hasattr(v, "scales")


def load_transformer(tensors: dict, config: TransformerConfig, device="cpu", dtype: torch.dtype = torch.float32,
                     make_linear=LowBitLinear, source="transformer", ops: Ops = TORCH_OPS) -> Flux2Transformer:
    """Build the model from a diffusers-keyed state dict whose values are tensors or `LowBitWeight`s.

    Linears given as `LowBitWeight` become `make_linear(weight, device=, dtype=)` (never densified here); dense
    tensors are cast to `dtype` and assigned. Strict: missing, unexpected or mis-shaped keys raise ValueError
    (`bonsai.state.check_state`), naming `source` (the file the tensors came from) first.
    """
    with torch.device("meta"):
        model = Flux2Transformer(config, ops)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state(source, expected, {k: tuple(v.shape) for k, v in tensors.items()})
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    not_linear = [k for k, v in tensors.items() if _is_lowbit(v) and k.removesuffix(".weight") not in linears]
    if not_linear:
        raise BonsaiValueError(f"{source}: low-bit weights for non-linear parameters {few(not_linear)}")

    dense = {}
    for key, value in tensors.items():
        if _is_lowbit(value):
            parent_name, _, child = key.removesuffix(".weight").rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, make_linear(value, device=device, dtype=dtype))
        else:
            dense[key] = value.to(device=device, dtype=dtype)
    # Only dense keys are loaded here; the low-bit modules above already hold their buffers.
    model.load_state_dict(dense, strict=False, assign=True)
    still_meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if still_meta:
        raise BonsaiValueError(f"{source}: parameters left unloaded: {few(still_meta)}")
    return model.eval().requires_grad_(False)
