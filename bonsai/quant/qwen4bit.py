"""The two released 4-bit Qwen3 text-encoder formats -> a dense transformers Qwen3 state dict (or, for HQQ, the
linears kept packed as `Int4Weight`).

HQQ (`text_encoder-hqq-4bit/qmodel.pt`): `{leaf module name: module state}`; quantized leaves hold `W_q` uint8
[out*in/g/2, g] (rows of the [out*in/g, g] code matrix split in halves: first half in the high nibble), `scale`
and `zero` [out*in/g, 1], and W = (q - zero) * scale reshaped to `shape`.
MLX (`text_encoder-mlx-4bit/model.safetensors`): affine 4-bit, uint32 [out, in/8] LSB-first, bf16 scales and
biases [out, in/g], W = q * scale + bias; the embedding is quantized too.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from ..errors import BonsaiValueError
from ..state import check_finite

HQQ_LINEAR_KEYS = ("W_q", "nbits", "group_size", "shape", "scale", "zero", "axis", "packing")


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BonsaiValueError(f"{where}: {msg}")


def _ints(value, n: int, where: str) -> tuple[int, ...]:
    """n ints from a stored int, torch.Size, list or integer tensor (a pickle may hold any of them)."""
    try:
        out = tuple(operator.index(v) for v in (list(value) if n > 1 else [value]))
    except (TypeError, ValueError, RuntimeError):  # not integers (floats, strings, a multi-element tensor)
        out = ()
    _check(len(out) == n, where, f"expected {n} integer(s), got {' '.join(str(value).split())[:80]}")
    return out


def unpack_4bit_u8(W_q: torch.Tensor) -> torch.Tensor:
    """HQQ '4bit_u8': uint8 [R/2, g] -> codes uint8 [R, g], high nibbles first."""
    return torch.cat([W_q >> 4, W_q & 0x0F], dim=0)


def pack_4bit_u8(q: torch.Tensor) -> torch.Tensor:
    """Inverse of `unpack_4bit_u8`: codes uint8 [R, g] (R even) -> [R/2, g]."""
    half = q.shape[0] // 2
    return (q[:half] << 4) | q[half:]


@dataclass(frozen=True)
class Int4Weight:
    """A 4-bit affine linear kept packed: W = (q - zero) * scale, one (scale, zero) per `group_size` inputs.

    packed: uint8 [out, in / 2], LSB-first along in (q[2j] in the low nibble, q[2j + 1] in the high one);
    scale, zero: as stored (HQQ: fp16) [out, in / group_size].
    """

    packed: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def codes(self) -> torch.Tensor:
        """uint8 [out, in] codes 0..15."""
        return torch.stack([self.packed & 0x0F, self.packed >> 4], dim=-1).reshape(self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [out, in]: (q - zero) * scale in fp32, rounded once to `dtype` (as HQQ's own dequantize)."""
        out, k = self.shape
        q = self.codes().view(out, k // self.group_size, self.group_size).float()  # [out, G, g]
        w = (q - self.zero.float().unsqueeze(-1)) * self.scale.float().unsqueeze(-1)
        return w.reshape(out, k).to(dtype)

    def to(self, device) -> "Int4Weight":
        return Int4Weight(self.packed.to(device), self.scale.to(device), self.zero.to(device), self.group_size)


def hqq_linear_codes(state: dict, name: str) -> Int4Weight:
    """One serialized HQQLinear (4-bit, axis 1, '4bit_u8') -> Int4Weight (codes repacked along in)."""
    missing = [k for k in HQQ_LINEAR_KEYS if k not in state]
    _check(not missing, name, f"HQQ linear misses {missing}")
    (nbits,) = _ints(state["nbits"], 1, f"{name}.nbits")
    _check(nbits == 4 and state["packing"] == "4bit_u8", name,
           f"expected 4-bit '4bit_u8' packing, got nbits={nbits} packing={state['packing']!r}")
    _check(_ints(state["axis"], 1, f"{name}.axis") == (1,), name, f"expected axis 1 (groups along in), got "
           f"{state['axis']}")
    _check(not state.get("view_as_float", False), name, "view_as_float packs are not supported")
    _check(not state.get("quant_scale", False) and not state.get("quant_zero", False), name,
           "quantized scale/zero meta is not supported")
    out, k = _ints(state["shape"], 2, f"{name}.shape")
    (g,) = _ints(state["group_size"], 1, f"{name}.group_size")
    _check(out > 0 and g > 0 and k % g == 0 and out * k // g % 2 == 0, name,
           f"shape {(out, k)} does not split into pairs of groups of {g}")
    W_q = state["W_q"]
    for key in ("W_q", "scale", "zero"):
        _check(isinstance(state[key], torch.Tensor), f"{name}.{key}", f"expected a tensor, got "
               f"{type(state[key]).__name__}")
    _check(W_q.dtype == torch.uint8 and tuple(W_q.shape) == (out * k // g // 2, g), f"{name}.W_q",
           f"expected uint8 {(out * k // g // 2, g)} for shape {(out, k)} and group {g}, got {W_q.dtype} "
           f"{tuple(W_q.shape)}")
    for key in ("scale", "zero"):
        _check(tuple(state[key].shape) == (out * k // g, 1) and state[key].is_floating_point(), f"{name}.{key}",
               f"expected float {(out * k // g, 1)}, got {state[key].dtype} {tuple(state[key].shape)}")
    q = unpack_4bit_u8(W_q).reshape(out, k)  # row r of [out*in/g, g] is group r % (in/g) of output r // (in/g)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [out, in / 2]
    return Int4Weight(packed, state["scale"].reshape(out, k // g), state["zero"].reshape(out, k // g), g)


def hqq_linear_to_dense(state: dict, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One serialized HQQLinear (4-bit, axis 1, '4bit_u8') -> dense weight [out, in]."""
    return hqq_linear_codes(state, name).dequantize(dtype)


def hqq_to_dense(qmodel: dict, dtype: torch.dtype = torch.float32, keep=lambda key: True,
                 packed: bool = False, device=None, source="qmodel.pt") -> dict[str, torch.Tensor | Int4Weight]:
    """qmodel.pt contents -> {'<leaf>.weight': dense tensor} for every leaf whose key passes `keep`; with
    `packed`, the quantized linears stay `Int4Weight`, repacked on `device` (a GPU does it in milliseconds).
    Float tensors (scale, zero, dense weights) must be finite; errors name `source` (the file) and the key."""
    state = {}
    for leaf, module_state in qmodel.items():
        key, where = f"{leaf}.weight", f"{source}: {leaf}"
        if not keep(key):
            continue
        _check(isinstance(module_state, dict), where,
               f"expected a module state dict, got {type(module_state).__name__}")
        if device is not None and "W_q" in module_state:
            module_state = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in module_state.items()}
        check_finite(source, {f"{leaf}.{k}": v for k, v in module_state.items()})  # where it is repacked
        if "W_q" in module_state:
            _check("bias" not in module_state or module_state["bias"] is None, where, "linear biases are not expected")
            w = hqq_linear_codes(module_state, where)
            state[key] = w if packed else w.dequantize(dtype)
        else:
            _check(set(module_state) == {"weight"} and isinstance(module_state["weight"], torch.Tensor), where,
                   f"expected only a 'weight' tensor, got {list(module_state)}")
            state[key] = module_state["weight"].to(dtype)
    return state


def mlx4_to_dense(weight: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int, name: str,
                  bits: int = 4, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MLX affine uint32 [out, in*bits/32] + scales/biases [out, in/g] -> dense [out, in]."""
    _check(weight.dtype in (torch.uint32, torch.int32) and weight.ndim == 2, f"{name}.weight",
           f"expected 2-D uint32, got {weight.dtype} {tuple(weight.shape)}")
    out, words = weight.shape
    k = words * 32 // bits
    for key, t in (("scales", scales), ("biases", biases)):
        _check(tuple(t.shape) == (out, k // group_size), f"{name}.{key}",
               f"expected {(out, k // group_size)} for weight {tuple(weight.shape)}, got {tuple(t.shape)}")
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    b = weight.contiguous().view(torch.uint8)  # [out, words * 4], little-endian
    q = ((b.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(out, k // group_size, group_size)  # [out, G, g]
    w = q.float() * scales.float().unsqueeze(-1) + biases.float().unsqueeze(-1)
    return w.reshape(out, k).to(dtype)


def mlx4_pack(dense: torch.Tensor, group_size: int = 64, bits: int = 4) -> dict[str, torch.Tensor]:
    """Min/max affine quantization in the MLX layout (what mx.quantize writes), bf16 meta. For writing test packs."""
    out, k = dense.shape
    w = dense.float().reshape(out, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).clamp(min=1e-8).to(torch.bfloat16).float()
    bias = lo.to(torch.bfloat16).float()
    q = torch.round((w - bias.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp(0, levels).to(torch.uint8).reshape(out, k)
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    packed = (q.to(torch.int32).reshape(out, k // per, per) << shifts).sum(-1).to(torch.uint8)  # [out, k*bits/8]
    return {"weight": packed.view(torch.uint32), "scales": scale.to(torch.bfloat16), "biases": bias.to(torch.bfloat16)}
