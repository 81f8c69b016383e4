"""CUDA low-bit linear, fast path: packed codes resident, expanded per call into a shared scratch, then cuBLAS."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..torch.linear import LowBitLinear
from .kernels import expand_lowbit

# One scratch per (device, dtype), grown to the largest layer seen. Layers run one after another on one
# stream, so a single buffer is never read and written at the same time.
_SCRATCH: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def scratch(numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, shared by every layer on this device and dtype."""
    key = (torch.device(device), dtype)
    buf = _SCRATCH.get(key)
    if buf is None or buf.numel() < numel:
        _SCRATCH.pop(key, None)
        buf = torch.empty(numel, device=device, dtype=dtype)
        _SCRATCH[key] = buf
    return buf[:numel]


def scratch_buffers() -> list[torch.Tensor]:
    """The current scratch buffers (a CUDA graph captured against them must keep them alive)."""
    return list(_SCRATCH.values())


def release_scratch() -> None:
    """Drop the scratch buffers (they are re-made on the next call)."""
    _SCRATCH.clear()


def _lowbit_linear_impl(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int,
                        group_size: int, in_features: int) -> torch.Tensor:
    w = scratch(packed.shape[0] * in_features, x.device, x.dtype).view(packed.shape[0], in_features)  # [N, K]
    expand_lowbit(packed, scales, bits, group_size, in_features, w)
    return F.linear(x, w)


_OP = None


def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  in_features: int) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] with W expanded from packed codes; a torch.library op (bonsai::lowbit_linear)."""
    global _OP
    if _OP is None:
        _OP = _register_op()
    return _OP(x, packed, scales, bits, group_size, in_features)


def _register_op():
    # Registered on first use (no import-time work); the scratch is internal, so the op is functional
    # from torch.compile's point of view.
    @torch.library.custom_op("bonsai::lowbit_linear", mutates_args=())
    def op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
           in_features: int) -> torch.Tensor:
        return _lowbit_linear_impl(x, packed, scales, bits, group_size, in_features)

    @op.register_fake
    def _(x, packed, scales, bits, group_size, in_features):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    return op


class FastLowBitLinear(LowBitLinear):
    """The torch backend's low-bit linear (same buffers), with the CUDA expand + cuBLAS forward."""

    def __init__(self, weight, device="cuda", dtype: torch.dtype | None = None):
        super().__init__(weight, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        if torch.compiler.is_compiling():
            return lowbit_linear(x, self.packed, self.scales, self.bits, self.group_size, self.in_features)
        # Eager: skip the custom-op dispatch (a few us per call, 100 calls per step).
        return _lowbit_linear_impl(x, self.packed, self.scales, self.bits, self.group_size, self.in_features)


LINEARS = ("auto", "fast", "gemlite")


def make_linear_factory(linear: str = "auto"):
    """`make_linear(weight, device=, dtype=)` for the chosen CUDA linear.

    "auto" is the fast path: on an H100 it beat gemlite at every FLUX shape with M >= 64 and ran the 4B step
    1.5-1.7x faster (benchmarks/results/h100.md); gemlite stays available for its smaller working set.
    """
    if linear not in LINEARS:
        raise ValueError(f"linear must be one of {LINEARS}, got {linear!r}")
    if linear == "gemlite":
        from .gemlite import make_gemlite_linear

        return make_gemlite_linear
    return FastLowBitLinear
