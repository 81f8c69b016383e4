"""gemlite path: binary/ternary linears as gemlite `GemLiteLinearTriton` layers (bf16 or fp16 activations).

Released gemlite packs load through gemlite's own state-dict loader (no repacking): W_q, scales and zeros are
used as stored; only the activation dtype slots of the metadata follow the runtime dtype. Other layouts are
packed by gemlite's `pack()` (8-bit packing, as released) in the same fma form as the released files:
ternary W_q = t + 1, scales = s, zeros = 1 -> stored -s; binary W_q = (b + 1) / 2, scales = 2s, zeros = 0.5 as a
float tensor (a Python 0.5 would be truncated to 0 by gemlite) -> stored -s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import torch

from ...files import cache_dir
from ...layouts import GemliteMeta, Kind, check_gemlite_linear, split_gemlite_state

INSTALL_HINT = "pip install -e .[cuda]"


def import_gemlite():
    """Import gemlite (it queries the CUDA device at import time, so only call this on a CUDA host)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the gemlite path needs a CUDA device (gemlite queries it at import)")
    try:
        import gemlite
    except ImportError as e:
        raise ImportError(f"gemlite is not installed; install the CUDA extra: {INSTALL_HINT}") from e
    # gemlite's small-M kernels (M < 64: GEMV / split-K) sum partial results with atomics in the output dtype;
    # in bf16 that rounds every partial sum (rel. error ~9e-3 measured on an H100 at 3072x3072, M=1). Make them
    # accumulate in an fp32 buffer and cast once. Large M (GEMM) is unaffected.
    gemlite.set_native_atomic_bfp16(False)
    return gemlite


def _dtype_code(dtype: torch.dtype) -> int:
    from gemlite.dtypes import DType

    table = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}
    if dtype not in table:
        raise ValueError(f"gemlite activations must be torch.bfloat16 or torch.float16, got {dtype}")
    return table[dtype].value


@dataclass(frozen=True, eq=False)
class GemliteState:
    """One linear of a released gemlite state dict, kept as stored. Has `.packed`/`.scales`/`.shape` so
    `load_transformer` treats it as a low-bit weight and hands it to `make_gemlite_linear` untouched."""

    state: dict

    @property
    def packed(self) -> torch.Tensor:
        return self.state["W_q"]

    @property
    def scales(self) -> torch.Tensor:
        return self.state["scales"]

    @property
    def shape(self) -> tuple[int, int]:
        out, k = (int(v) for v in self.state["orig_shape"].flatten().tolist())
        return (out, k)

    @property
    def bits(self) -> int:
        return GemliteMeta.from_tensor(self.state["metadata"]).W_nbits


def _forward(layer, x: torch.Tensor) -> torch.Tensor:
    # gemlite picks GEMM_SPLITK for 5 <= M < 64. On an H100 (triton 3.6, gemlite 0.6.0.post2) that path hung
    # the GPU in our tests, so those M run the plain GEMM kernel (same numerics; M is small, so the padding to
    # the tile height costs little). Every other M keeps gemlite's own choice.
    m = x.numel() // x.shape[-1]
    if 4 < m < 64:
        return layer.forward_manual(x, "GEMM")
    return layer.forward_auto_no_warmup(x)


def _finish(layer):
    layer.forward = functools.partial(_forward, layer)  # gemlite itself binds `forward` per instance
    return layer


def from_state(state: dict, device="cuda", dtype: torch.dtype = torch.bfloat16, name: str = "linear"):
    """A gemlite state dict (W_q, scales, zeros, metadata, orig_shape[, bias]) -> GemLiteLinearTriton.

    The packed codes, scales and zeros are used as stored (float32 meta in the released files); only the
    input/output dtype slots of the metadata are set to `dtype`, since gemlite reads x in that dtype.
    """
    gemlite = import_gemlite()
    check_gemlite_linear(name, state)
    meta = GemliteMeta.from_tensor(state["metadata"], f"{name}.metadata")
    Kind.from_bits(meta.W_nbits, f"{name}.metadata.W_nbits")
    # Cheap shape checks here, so a malformed pack fails naming the key rather than deep inside a kernel.
    out_f, in_f = (int(v) for v in state["orig_shape"].flatten().tolist())
    eps, group = meta.elements_per_sample, meta.group_size
    if tuple(state["W_q"].shape) != (in_f // max(eps, 1), out_f):
        raise ValueError(f"{name}.W_q: shape {tuple(state['W_q'].shape)}, expected [in/{eps}, out] = "
                         f"{(in_f // max(eps, 1), out_f)} for orig_shape {(out_f, in_f)}")
    for key in ("scales", "zeros"):
        if tuple(state[key].shape) != (in_f // group, out_f) or not state[key].is_floating_point():
            raise ValueError(f"{name}.{key}: expected float [in/{group}, out] = {(in_f // group, out_f)}, got "
                             f"{state[key].dtype} {tuple(state[key].shape)}")
    code = _dtype_code(dtype)
    meta = meta._replace(input_dtype=code, output_dtype=code)
    sd = {
        "W_q": state["W_q"].to(device),
        "scales": state["scales"].to(device),
        "zeros": state["zeros"].to(device),
        "metadata": meta.to_tensor(device),
        "orig_shape": state["orig_shape"].to(device=device, dtype=torch.int32),
    }
    if state.get("bias") is not None:
        sd["bias"] = state["bias"].to(device=device, dtype=dtype)
    layer = gemlite.GemLiteLinearTriton()
    layer.load_state_dict(sd)
    return _finish(layer)


def from_lowbit(weight, device="cuda", dtype: torch.dtype = torch.bfloat16, packing_bitwidth: int = 8):
    """Pack a `LowBitWeight` with gemlite's own `pack()` (8-bit packing and float32 meta, as released)."""
    gemlite = import_gemlite()
    if weight.bits not in (1, 2):
        raise ValueError(f"gemlite path supports bits 1 or 2, got {weight.bits}")
    from ..torch.linear import unpack_codes

    out_f, in_f = (int(d) for d in weight.shape)
    code = gemlite.DType(_dtype_code(dtype))
    layer = gemlite.GemLiteLinearTriton(W_nbits=weight.bits, group_size=int(weight.group_size),
                                        in_features=in_f, out_features=out_f, input_dtype=code, output_dtype=code)
    # The stored codes already are gemlite's unsigned ones: ternary q = t + 1, binary q = (b + 1) / 2.
    q = unpack_codes(weight.packed.to(device), weight.bits, in_f).contiguous()  # uint8 [N, K]
    s = weight.scales.to(device=device, dtype=torch.float32)
    if weight.bits == 2:
        layer.pack(q, s, torch.ones_like(s), packing_bitwidth=packing_bitwidth)  # W = q*s - s
    else:
        s2 = 2 * s  # exact: doubling only changes the exponent
        layer.pack(q, s2, torch.full_like(s2, 0.5), packing_bitwidth=packing_bitwidth)  # W = q*2s - s
    return _finish(layer)


def make_gemlite_linear(weight, device="cuda", dtype: torch.dtype = torch.bfloat16):
    """`make_linear` for the torch transformer: a released gemlite state as stored, or a `LowBitWeight` packed
    by gemlite."""
    if isinstance(weight, GemliteState):
        return from_state(weight.state, device=device, dtype=dtype)
    return from_lowbit(weight, device=device, dtype=dtype)


def split_state(state: dict, source="gemlite state") -> dict:
    """Flat released state dict {fqn.W_q: ..., fqn.weight: ...} -> {fqn.weight: GemliteState | dense tensor}.

    A linear's optional "bias" and gemlite >= 0.6's "meta_scale" stay in its GemliteState.
    """
    groups, out = split_gemlite_state(state, source, extra=("bias", "meta_scale"))
    out.update({f"{prefix}.weight": GemliteState(group) for prefix, group in groups.items()})
    return out


def gpu_cache_file(prefix: str, directory: str | Path | None = None) -> Path:
    """A per-GPU-model file in the user cache, e.g. ~/.cache/bonsai/<prefix>-NVIDIA_H100_80GB_HBM3.json."""
    name = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return Path(directory or cache_dir()) / f"{prefix}-{name}.json"


def autotune_cache_path(directory: str | Path | None = None) -> Path:
    """Per-GPU-model gemlite autotune cache."""
    return gpu_cache_file("gemlite", directory)


def load_autotune(path: str | Path) -> bool:
    """Load a gemlite autotune json (a released `gemlite_autotune.json` or our own cache) if it exists."""
    path = Path(path)
    if not path.is_file():
        return False
    return bool(import_gemlite().load_config(str(path), print_error=False))


def save_autotune(path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    import_gemlite().cache_config(str(path))
