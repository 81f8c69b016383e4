"""CUDA low-bit linear, fast path: packed codes resident; per call either expanded into a shared scratch for
cuBLAS, or fed to our Triton GEMM that unpacks in the K loop, whichever measured faster for the shape."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..torch.linear import Int4Linear, LowBitLinear
from . import choice
from .kernels import GEMM_CONFIGS, expand_lowbit, lowbit_gemm, quantize_fp8

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


def _config(name: str) -> tuple[int, ...]:
    return tuple(int(v) for v in name.split("/")[1].split("x"))


def _run(impl: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
         in_features: int, x8=None) -> torch.Tensor:
    """One candidate on x [M, K]: "cublas" (expand to x.dtype, cuBLAS), "fused/<cfg>" (unpack in the K loop),
    "expand8/<cfg>" (expand fp8 codes, block-scaled fp8 GEMM). x8 = quantize_fp8(x) selects fp8 activations."""
    n = packed.shape[0]
    if impl == "cublas":
        w = scratch(n * in_features, x.device, x.dtype).view(n, in_features)  # [N, K]
        expand_lowbit(packed, scales, bits, group_size, in_features, w)
        return F.linear(x, w)
    config = _config(impl)
    if impl.startswith("fused/"):
        if x8 is None:
            return lowbit_gemm(x, packed, scales, bits, group_size, in_features, config=config)
        return lowbit_gemm(x8[0], packed, scales, bits, group_size, in_features, x_scales=x8[1],
                           out_dtype=x.dtype, config=config)
    codes = scratch(n * in_features, x.device, torch.float8_e4m3fn).view(n, in_features)  # [N, K], t exact
    expand_lowbit(packed, None, bits, group_size, in_features, codes)
    return lowbit_gemm(x8[0], codes, scales, bits, group_size, in_features, x_scales=x8[1], out_dtype=x.dtype,
                       config=config)


def candidates(linear: str, fp8: bool, m: int) -> list[str]:
    """The GEMMs `linear` ("auto", "expand", "fused") may use at M tokens; the first is the unmeasured default."""
    configs = ["x".join(map(str, c)) for c in GEMM_CONFIGS if (c[0] <= 64) == (m <= 64)]
    fused = [f"fused/{c}" for c in configs]
    expand = [f"expand8/{c}" for c in configs] if fp8 else ["cublas"]
    return {"expand": expand, "fused": fused, "auto": expand + fused}[linear]


def _lowbit_linear_impl(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                        in_features: int, linear: str = "expand", fp8: bool = False) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, in_features)  # [M, K]
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, n = x.shape[0], packed.shape[0]
    x8 = quantize_fp8(x, group_size) if fp8 else None
    names = candidates(linear, fp8, m)
    impl = names[0]
    if len(names) > 1:
        k = choice.key("fp8" if fp8 else str(x.dtype).removeprefix("torch."), bits, n, in_features, m)
        impl = choice.get(k)
        if impl is None:
            # Measuring synchronizes, which a CUDA graph capture must not do: captures use the default until an
            # eager call (GraphedForward's warmup run) has measured this shape.
            capturing = torch.cuda.is_current_stream_capturing()
            impl = names[0] if capturing else choice.measure(k, {
                name: (lambda name=name: _run(name, x, packed, scales, bits, group_size, in_features, x8))
                for name in names})
    return _run(impl, x, packed, scales, bits, group_size, in_features, x8).view(*lead, n)


_OP = None


def lowbit_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
                  in_features: int, linear: str = "expand", fp8: bool = False) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] from packed codes; a torch.library op (bonsai::lowbit_linear)."""
    global _OP
    if _OP is None:
        _OP = _register_op()
    return _OP(x, packed, scales, bits, group_size, in_features, linear, fp8)


def _register_op():
    # Registered on first use (no import-time work); the scratch is internal, so the op is functional
    # from torch.compile's point of view.
    @torch.library.custom_op("bonsai::lowbit_linear", mutates_args=())
    def op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
           in_features: int, linear: str, fp8: bool) -> torch.Tensor:
        return _lowbit_linear_impl(x, packed, scales, bits, group_size, in_features, linear, fp8)

    @op.register_fake
    def _(x, packed, scales, bits, group_size, in_features, linear, fp8):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    return op


class FastLowBitLinear(LowBitLinear):
    """The torch backend's low-bit linear (same buffers) with our CUDA GEMMs.

    linear: "expand" (codes expanded into a shared scratch, then cuBLAS), "fused" (our Triton GEMM unpacking in
    the K loop) or "auto" (the faster of the two, measured per shape and token count). activations: "fp8" for
    e4m3 activations with one scale per token and 128-group (fp8 tensor cores), else the input's dtype.
    """

    def __init__(self, weight, device="cuda", dtype: torch.dtype | None = None, linear: str = "auto",
                 activations: str | None = None):
        super().__init__(weight, device=device, dtype=dtype)
        if linear not in ("auto", "expand", "fused"):
            raise ValueError(f"linear must be 'auto', 'expand' or 'fused', got {linear!r}")
        if activations not in (None, "fp8"):
            raise ValueError(f"activations must be None or 'fp8', got {activations!r}")
        self.linear, self.fp8 = linear, activations == "fp8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        args = (x, self.packed, self.scales, self.bits, self.group_size, self.in_features, self.linear, self.fp8)
        if torch.compiler.is_compiling():
            return lowbit_linear(*args)
        # Eager: skip the custom-op dispatch (a few us per call, 100 calls per step).
        return _lowbit_linear_impl(*args)


class FastInt4Linear(Int4Linear):
    """The text encoder's HQQ 4-bit linear: codes expanded into the shared scratch, then cuBLAS (M = prompt tokens
    is large enough for the GEMM to dominate, like the transformer's fast path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        w = scratch(n * k, x.device, x.dtype).view(n, k)  # [N, K]
        expand_lowbit(self.packed, self.scale, 4, self.group_size, k, w, zeros=self.zero)
        return F.linear(x, w)


LINEARS = ("auto", "expand", "fused", "gemlite")


def make_linear_factory(linear: str = "auto", activations: str | None = None):
    """`make_linear(weight, device=, dtype=)` for the chosen CUDA linear (see FastLowBitLinear; or "gemlite")."""
    if linear not in LINEARS:
        raise ValueError(f"linear must be one of {LINEARS}, got {linear!r}")
    if activations not in (None, "fp8"):
        raise ValueError(f"activations must be None or 'fp8', got {activations!r}")
    if linear == "gemlite":
        if activations is not None:
            raise ValueError("activations='fp8' needs linear 'auto', 'expand' or 'fused', not 'gemlite'")
        from .gemlite import make_gemlite_linear

        return make_gemlite_linear
    return functools.partial(FastLowBitLinear, linear=linear, activations=activations)
