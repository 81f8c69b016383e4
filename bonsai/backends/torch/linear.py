"""A low-bit linear in plain torch: packed codes stay resident, one layer is unpacked at a time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """uint8 [out, in * bits / 8] (LSB-first along in) -> unsigned codes uint8 [out, in]."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)  # [8 / bits]
    q = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [out, in * bits / 8, 8 / bits]
    return q.reshape(packed.shape[0], -1)[:, :in_features]


def dequantize(packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int, in_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Packed ternary (bits=2, q = t + 1) or binary (bits=1, q = (b + 1) / 2) codes -> dense [out, in] in `dtype`."""
    q = unpack_codes(packed, bits, in_features).to(dtype)
    t = q - 1 if bits == 2 else 2 * q - 1  # exact in any float dtype: values are -1, 0, +1
    out = t.shape[0]
    w = t.view(out, in_features // group_size, group_size) * scales.to(dtype).unsqueeze(-1)  # [out, groups, g]
    return w.view(out, in_features)


class LowBitLinear(nn.Module):
    """y = x @ W.T with W = codes * per-group scales; no bias. Built from a `bonsai.quant.LowBitWeight`."""

    def __init__(self, weight, device=None, dtype: torch.dtype | None = None):
        # dtype is accepted for the make_linear contract; the weight is unpacked to each input's dtype.
        super().__init__()
        if weight.bits not in (1, 2):
            raise ValueError(f"LowBitLinear supports bits 1 (binary) or 2 (ternary), got {weight.bits}")
        self.out_features, self.in_features = (int(d) for d in weight.shape)
        self.kind = weight.kind
        self.bits = int(weight.bits)
        self.group_size = int(weight.group_size)
        self.register_buffer("packed", weight.packed.to(device=device, dtype=torch.uint8).contiguous())
        self.register_buffer("scales", weight.scales.to(device=device, dtype=torch.float32).contiguous())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [out, in] copy in `dtype`."""
        return dequantize(self.packed, self.scales, self.bits, self.group_size, self.in_features, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kind={self.kind}, group_size={self.group_size}"


def project(x: torch.Tensor, linears) -> tuple[torch.Tensor, ...]:
    """x through several linears that read it (an attention's q, k, v; a gate and its up projection). A linear
    class with `run_together` (the CUDA fast path: one GEMM over the weights side by side) takes them in one call."""
    kind = type(linears[0])
    if hasattr(kind, "run_together") and all(type(linear) is kind for linear in linears):
        return kind.run_together(x, linears)
    return tuple(linear(x) for linear in linears)


def dense_linear(weight, device=None, dtype: torch.dtype = torch.float32) -> nn.Linear:
    """`make_linear` that expands a `LowBitWeight` into a plain dense linear (the dense baseline: same model,
    16 bits per weight)."""
    out_f, in_f = (int(d) for d in weight.shape)
    linear = nn.Linear(in_f, out_f, bias=False, device="meta")
    linear.weight = nn.Parameter(dequantize(weight.packed.to(device), weight.scales.to(device), weight.bits,
                                            weight.group_size, in_f, dtype), requires_grad=False)
    return linear


class Int4Linear(nn.Module):
    """y = x @ W.T with W = (q - zero) * scale, 4-bit codes packed along in (a `bonsai.quant.Int4Weight`)."""

    def __init__(self, weight, device=None, dtype: torch.dtype | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = int(weight.group_size)
        self.register_buffer("packed", weight.packed.to(device=device, dtype=torch.uint8).contiguous())
        self.register_buffer("scale", weight.scale.to(device).contiguous())
        self.register_buffer("zero", weight.zero.to(device).contiguous())

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from ...quant.qwen4bit import Int4Weight

        return Int4Weight(self.packed, self.scale, self.zero, self.group_size).dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense(x.dtype))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=4, group_size={self.group_size}"
