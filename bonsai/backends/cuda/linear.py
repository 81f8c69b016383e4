"""CUDA low-bit linear, fast path: packed codes resident; per call either expanded into a shared scratch for
cuBLAS, or fed to our Triton GEMM that unpacks in the K loop, whichever measured faster for the shape.

The state the layers share belongs to objects the runtime creates and passes to each layer: a `Workspace` (the
expand scratch of one device) and a `choice.GemmChoices` table (the measured GEMM per shape).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...errors import BonsaiValueError
from ..torch.linear import Int4Linear, LowBitLinear
from .choice import GemmChoices, GemmKey
from .kernels import GEMM_CONFIGS, expand_lowbit, lowbit_gemm, quantize_fp8


class Workspace:
    """The expand scratch of one device: one flat buffer per dtype, shared by every layer built against it and
    grown to the largest layer that ran. `numel` is the largest layer built against it (`require`, called by
    each layer's constructor).

    Layers run one after another on one stream, so a single buffer per dtype is never read and written at the
    same time; layers run concurrently (another stream, another thread) need a workspace each.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.numel = 0
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def require(self, numel: int) -> None:
        """Record a layer of `numel` elements (N * K) that will use this workspace; allocates nothing."""
        self.numel = max(self.numel, int(numel))

    def buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """The flat `dtype` buffer, grown to at least `numel` elements (allocated on first use)."""
        buf = self._buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(dtype, None)  # free the smaller one before allocating the larger
            buf = self._buffers[dtype] = torch.empty(numel, device=self.device, dtype=dtype)
        return buf

    def buffers(self) -> list[torch.Tensor]:
        """The buffers allocated now (a CUDA graph captured against them must keep them alive)."""
        return list(self._buffers.values())

    def release(self) -> None:
        """Drop the buffers; the next call allocates them again."""
        self._buffers.clear()


def _config(name: str) -> tuple[int, ...]:
    return tuple(int(v) for v in name.split("/")[1].split("x"))


def _expand_gemm(x: torch.Tensor, weights, bits: int, group_size: int, in_features: int, scratch: torch.Tensor,
                 x8=None, scale_scratch: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] times the weights (packed, scales) expanded side by side into `scratch` (their rows stacked):
    cuBLAS in x.dtype, or with x8 = quantize_fp8(x) the codes in e4m3 and the scales N-major into
    `scale_scratch`, then cuBLAS's 1x128-block-scaled fp8 GEMM. -> [M, sum N]"""
    k, g = in_features, group_size
    n = sum(packed.shape[0] for packed, _ in weights)
    w = scratch[: n * k].view(n, k)  # [N, K]
    s = None if x8 is None else scale_scratch[: n * k // g].view(k // g, n)  # [K / 128, N]
    row = 0
    for packed, scales in weights:
        rows = slice(row, row + packed.shape[0])
        expand_lowbit(packed, scales if s is None else None, bits, g, k, w[rows])  # fp8: the codes t, exact
        if s is not None:
            s[:, rows].copy_(scales.t())
        row = rows.stop
    if x8 is None:
        return F.linear(x, w)
    block = F.ScalingType.BlockWise1x128
    return F.scaled_mm(x8[0], w.t(), x8[1], block, s.t(), block, output_dtype=x.dtype)


def _run(impl: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int,
         in_features: int, scratch: torch.Tensor, x8=None, scale_scratch: torch.Tensor | None = None
         ) -> torch.Tensor:
    """One candidate on x [M, K]: "cublas" (expand into `scratch` of x.dtype, cuBLAS), "fused/<cfg>" (unpack in
    the K loop; no scratch), "cublas8" (expand the codes into `scratch` of e4m3 and the scales N-major into the
    fp32 `scale_scratch`, then cuBLAS's 1x128-block-scaled fp8 GEMM). scratch: flat, at least N * K elements;
    scale_scratch: at least N * K / group_size. x8 = quantize_fp8(x) selects fp8 activations."""
    k = in_features
    if impl in ("cublas", "cublas8"):
        return _expand_gemm(x, [(packed, scales)], bits, group_size, k, scratch, x8 if impl == "cublas8" else None,
                            scale_scratch)
    config = _config(impl)
    if x8 is None:
        return lowbit_gemm(x, packed, scales, bits, group_size, k, config=config)
    return lowbit_gemm(x8[0], packed, scales, bits, group_size, k, x_scales=x8[1], out_dtype=x.dtype,
                       config=config)


@functools.cache
def _hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def blockwise_fp8(device: torch.device, m: int, n: int) -> bool:
    """Whether cuBLAS's 1x128-block-scaled fp8 GEMM runs an [M, K] x [K, N] product on `device`: torch offers it
    on Hopper (sm_90) only, and cuBLAS takes M a multiple of 4 and N of 16 (on the H200, M = 1, 2, 3 fail)."""
    return _hopper(device) and m % 4 == 0 and n % 16 == 0


def candidates(linear: str, fp8: bool, m: int, blockwise: bool = False) -> list[str]:
    """The GEMMs `linear` ("auto", "expand", "fused") may use at M tokens; the first is the unmeasured default.
    blockwise: cuBLAS's block-scaled fp8 GEMM runs this product (`blockwise_fp8`, 128-input groups); where it
    does not, fp8 "expand" falls back to our fused GEMM."""
    configs = ["x".join(map(str, c)) for c in GEMM_CONFIGS if (c[0] <= 64) == (m <= 64)]
    fused = [f"fused/{c}" for c in configs]
    expand = (["cublas8"] if blockwise else []) if fp8 else ["cublas"]
    return {"expand": expand or fused[:1], "fused": fused, "auto": expand + fused}[linear]


def gemm_key(linear: str, fp8: bool, bits: int, n: int, k: int, m: int, dtype: torch.dtype) -> GemmKey:
    return GemmKey(linear, "fp8" if fp8 else str(dtype).removeprefix("torch."), bits, n, k, m)


def _lookup(choices: GemmChoices, key: GemmKey, names: list[str], device: torch.device) -> str | None:
    """The recorded choice, the only candidate, or the default where measuring cannot run; None: measure now."""
    if len(names) == 1:
        return names[0]
    impl = choices.get(key)
    if impl in names:  # a name from another kernel list (an older cache) is measured again
        return impl
    # Measuring synchronizes, which a CUDA graph capture must not do: captures use the default until an eager
    # call (GraphedForward's warmup run) has measured this shape. It also needs CUDA events: elsewhere (the Triton
    # interpreter in CI) the default runs.
    if device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return names[0]
    return None


def _check_workspace(workspace, device, layer: str) -> None:
    if not isinstance(workspace, Workspace):
        raise BonsaiValueError(f"{layer}: workspace must be a Workspace, got {type(workspace).__name__}")
    if device is not None and torch.device(device).type != workspace.device.type:
        raise BonsaiValueError(f"{layer}: workspace is on {workspace.device}, the layer on {device}")


class FastLowBitLinear(LowBitLinear):
    """The torch backend's low-bit linear (same buffers) with our CUDA GEMMs.

    linear: "expand" (codes expanded into the workspace's scratch, then cuBLAS), "fused" (our Triton GEMM
    unpacking in the K loop) or "auto" (the faster of the two, measured per shape and token count and recorded in
    `choices`). activations: "fp8" for e4m3 activations with one scale per token and 128-group (fp8 tensor
    cores: "expand" is then cuBLAS's block-scaled fp8 GEMM over the exact codes, Hopper only), else the input's
    dtype. workspace, choices: shared by all layers of a runtime.
    """

    def __init__(self, weight, device="cuda", dtype: torch.dtype | None = None, linear: str = "auto",
                 activations: str | None = None, *, workspace: Workspace, choices: GemmChoices):
        super().__init__(weight, device=device, dtype=dtype)
        if linear not in ("auto", "expand", "fused"):
            raise BonsaiValueError(f"linear must be 'auto', 'expand' or 'fused', got {linear!r}")
        if activations not in (None, "fp8"):
            raise BonsaiValueError(f"activations must be None or 'fp8', got {activations!r}")
        _check_workspace(workspace, device, "FastLowBitLinear")
        if not isinstance(choices, GemmChoices):
            raise BonsaiValueError(f"FastLowBitLinear: choices must be a GemmChoices, got {type(choices).__name__}")
        self.linear, self.fp8 = linear, activations == "fp8"
        self.workspace, self.choices = workspace, choices
        if self.fp8 and linear == "expand" and not (self.group_size == 128 and _hopper(workspace.device)):
            raise BonsaiValueError(f"linear='expand' with activations='fp8' needs cuBLAS's block-scaled fp8 GEMM: "
                                   f"a Hopper GPU (sm_90) and 128-input groups, not {workspace.device} with groups "
                                   f"of {self.group_size}; use linear='auto' or 'fused'")
        workspace.require(self.out_features * self.in_features)

    def gemm_key(self, m: int, dtype: torch.dtype) -> GemmKey:
        """The choice table's key of this layer at M tokens of `dtype` input."""
        return gemm_key(self.linear, self.fp8, self.bits, self.out_features, self.in_features, m, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise BonsaiValueError(f"input last dim {x.shape[-1]} != in_features {self.in_features}")
        lead, n, k = x.shape[:-1], self.out_features, self.in_features
        x = x.reshape(-1, k)  # [M, K]
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        x8 = quantize_fp8(x, self.group_size) if self.fp8 else None
        blockwise = self.fp8 and self.group_size == 128 and blockwise_fp8(x.device, m, n)
        names = candidates(self.linear, self.fp8, m, blockwise)
        expands = names[0] in ("cublas", "cublas8")  # the expand candidate comes first; "fused" has none
        sdt = torch.float8_e4m3fn if self.fp8 else x.dtype
        scratch = self.workspace.buffer(sdt, n * k) if expands else None
        sscratch = self.workspace.buffer(torch.float32, n * k // self.group_size) if "cublas8" in names else None
        run = functools.partial(_run, x=x, packed=self.packed, scales=self.scales, bits=self.bits,
                                group_size=self.group_size, in_features=k, scratch=scratch, x8=x8,
                                scale_scratch=sscratch)
        key = self.gemm_key(m, x.dtype)
        impl = _lookup(self.choices, key, names, x.device)
        if impl is None:
            impl = self.choices.measure(key, {name: functools.partial(run, name) for name in names})
        return run(impl).view(*lead, n)

    @classmethod
    def run_together(cls, x: torch.Tensor, layers) -> tuple[torch.Tensor, ...]:
        """x through several layers that read it (a double block's q, k, v): their weights expanded side by side
        into the workspace and one cuBLAS GEMM [M, sum N], whose column slices are their outputs. With fp8 the input
        is quantized once and cuBLAS's block-scaled GEMM runs far better 9216 wide than 3072 wide; in bf16 it
        measures the same as three GEMMs, bit for bit (`bench_cuda.py --sections projections`). Layers that differ
        in input width, bits, settings or workspace, the "fused" linear, fp8 without cuBLAS's block-scaled GEMM,
        and M <= 64 (the fused GEMM's range) run one by one."""
        first = layers[0]
        setting = (first.in_features, first.bits, first.group_size, first.linear, first.fp8, first.workspace)
        lead, k = x.shape[:-1], first.in_features
        m, ns = x[..., 0].numel(), [layer.out_features for layer in layers]
        blockwise = first.fp8 and first.group_size == 128 and blockwise_fp8(x.device, m, sum(ns))
        expands = candidates(first.linear, first.fp8, m, blockwise)[0] in ("cublas", "cublas8")
        alike = all((t.in_features, t.bits, t.group_size, t.linear, t.fp8, t.workspace) == setting for t in layers)
        if m <= 64 or x.shape[-1] != k or not (expands and alike):
            return tuple(layer(x) for layer in layers)
        x = x.reshape(-1, k)  # [M, K]
        if x.stride(-1) != 1:
            x = x.contiguous()
        n, ws = sum(ns), first.workspace
        x8 = quantize_fp8(x, first.group_size) if first.fp8 else None
        scratch = ws.buffer(torch.float8_e4m3fn if first.fp8 else x.dtype, n * k)
        sscratch = ws.buffer(torch.float32, n * k // first.group_size) if first.fp8 else None
        y = _expand_gemm(x, [(t.packed, t.scales) for t in layers], first.bits, first.group_size, k, scratch, x8,
                         sscratch)
        return y.view(*lead, n).split(ns, dim=-1)


class FastInt4Linear(Int4Linear):
    """The text encoder's HQQ 4-bit linear: codes expanded into the workspace's scratch, then cuBLAS (M = prompt
    tokens is large enough for the GEMM to dominate, like the transformer's fast path)."""

    def __init__(self, weight, device=None, dtype: torch.dtype | None = None, *, workspace: Workspace):
        super().__init__(weight, device=device, dtype=dtype)
        _check_workspace(workspace, device, "FastInt4Linear")
        self.workspace = workspace
        workspace.require(self.out_features * self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FastInt4Linear.run_together(x, (self,))[0]

    @classmethod
    def run_together(cls, x: torch.Tensor, layers) -> tuple[torch.Tensor, ...]:
        """x through several layers that read it (the text encoder's q, k, v; gate, up): their weights expanded side
        by side into the workspace, one GEMM [..., sum N], the outputs its column slices (at 512 prompt tokens the
        1024-wide k and v GEMMs alone leave most of the GPU idle). Layers of another input width, group or
        workspace: one by one."""
        first = layers[0]
        k, g, ws = first.in_features, first.group_size, first.workspace
        if len(layers) > 1 and any((t.in_features, t.group_size, t.workspace) != (k, g, ws) for t in layers):
            return tuple(cls.run_together(x, (t,))[0] for t in layers)
        ns = [t.out_features for t in layers]
        w = ws.buffer(x.dtype, sum(ns) * k)[: sum(ns) * k].view(sum(ns), k)  # [N, K]
        row = 0
        for t in layers:
            expand_lowbit(t.packed, t.scale, 4, g, k, w[row : row + t.out_features], zeros=t.zero)
            row += t.out_features
        return F.linear(x, w).split(ns, dim=-1)


def workspaces(model: torch.nn.Module) -> list[Workspace]:
    """The distinct workspaces of the fast layers in `model`."""
    found = {id(m.workspace): m.workspace for m in model.modules() if isinstance(m, (FastLowBitLinear, FastInt4Linear))}
    return list(found.values())


LINEARS = ("auto", "expand", "fused", "gemlite")


def make_linear_factory(linear: str = "auto", activations: str | None = None, *, workspace: Workspace | None = None,
                        choices: GemmChoices | None = None):
    """`make_linear(weight, device=, dtype=)` for the chosen CUDA linear (see FastLowBitLinear; or "gemlite").
    Our linears ("auto", "expand", "fused") need the runtime's `workspace` and `choices`; gemlite uses neither."""
    if linear not in LINEARS:
        raise BonsaiValueError(f"linear must be one of {LINEARS}, got {linear!r}")
    if activations not in (None, "fp8"):
        raise BonsaiValueError(f"activations must be None or 'fp8', got {activations!r}")
    if linear == "gemlite":
        if activations is not None:
            raise BonsaiValueError("activations='fp8' needs linear 'auto', 'expand' or 'fused', not 'gemlite'")
        from .gemlite import make_gemlite_linear

        return make_gemlite_linear
    if workspace is None or choices is None:
        raise BonsaiValueError(f"make_linear_factory: linear={linear!r} needs workspace= and choices=")
    return functools.partial(FastLowBitLinear, linear=linear, activations=activations, workspace=workspace,
                             choices=choices)
