"""gemlite path: binary/ternary linears as gemlite `GemLiteLinearTriton` layers (bf16 or fp16 activations).

Released gemlite packs load through gemlite's own state-dict loader (no repacking). Other layouts are
packed with `pack()`: ternary W_q = t + 1, zeros = 1 (int, exact integer shift); binary W_q = (b + 1) / 2,
scales = 2s, zeros = 0.5 as a float tensor (a Python 0.5 would be truncated to 0 by gemlite).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# gemlite metadata slots (core.GemLiteLinearTriton.get_meta_args)
_META_INPUT, _META_OUTPUT, _META_META = 5, 6, 8


def import_gemlite():
    """Import gemlite (it needs a CUDA device at import time)."""
    if not torch.cuda.is_available():
        raise RuntimeError("the gemlite backend needs a CUDA device (gemlite queries it at import)")
    try:
        import gemlite
    except ImportError as e:
        raise ImportError("gemlite is not installed; install the CUDA extra: pip install -e .[cuda]") from e
    return gemlite


def _dtype_enum(dtype: torch.dtype):
    from gemlite.dtypes import DType

    table = {torch.bfloat16: DType.BF16, torch.float16: DType.FP16}
    if dtype not in table:
        raise ValueError(f"gemlite activations must be bfloat16 or float16, got {dtype}")
    return table[dtype]


def from_state(state: dict[str, torch.Tensor], device="cuda", dtype: torch.dtype = torch.bfloat16):
    """A gemlite state dict (W_q, scales, zeros, metadata, orig_shape[, bias]) -> GemLiteLinearTriton.

    The packed codes are used as they are; scales/zeros are cast to the activation dtype and the
    metadata's input/output/meta dtypes rewritten, since gemlite needs x, scales and zeros to agree.
    """
    gemlite = import_gemlite()
    missing = [k for k in ("W_q", "scales", "zeros", "metadata", "orig_shape") if k not in state]
    if missing:
        raise ValueError(f"gemlite state dict is missing {missing}; got {sorted(state)}")
    code = _dtype_enum(dtype).value
    meta = state["metadata"].to(torch.int32).clone()
    meta[_META_INPUT] = meta[_META_OUTPUT] = meta[_META_META] = code
    sd = {
        "W_q": state["W_q"].to(device),
        "scales": state["scales"].to(device=device, dtype=dtype),
        # Integer zeros (mode 3) stay integer; float zeros (fma mode 4) follow the activation dtype.
        "zeros": state["zeros"].to(device=device, dtype=dtype if state["zeros"].is_floating_point() else None),
        "metadata": meta.to(device),
        "orig_shape": state["orig_shape"].to(device=device, dtype=torch.int32),
    }
    if state.get("bias") is not None:
        sd["bias"] = state["bias"].to(device=device, dtype=dtype)
    layer = gemlite.GemLiteLinearTriton()
    layer.load_state_dict(sd)
    return layer


def from_lowbit(weight, device="cuda", dtype: torch.dtype = torch.bfloat16, packing_bitwidth: int = 8):
    """Pack a `LowBitWeight` with gemlite's own packer (8-bit packing: the faster one on A100/H100)."""
    gemlite = import_gemlite()
    if weight.bits not in (1, 2):
        raise ValueError(f"gemlite path supports bits 1 or 2, got {weight.bits}")
    out_f, in_f = (int(d) for d in weight.shape)
    layer = gemlite.GemLiteLinearTriton(W_nbits=weight.bits, group_size=int(weight.group_size),
                                        in_features=in_f, out_features=out_f,
                                        input_dtype=_dtype_enum(dtype), output_dtype=_dtype_enum(dtype))
    from ..torch.linear import unpack_codes

    # The stored codes are already gemlite's unsigned ones: ternary q = t + 1, binary q = (b + 1) / 2.
    q = unpack_codes(weight.packed.to(device), weight.bits, in_f).contiguous()  # uint8 [N, K]
    s = weight.scales.to(device=device, dtype=torch.float32)
    if weight.bits == 2:
        layer.pack(q, s.to(dtype), 1, packing_bitwidth=packing_bitwidth)
    else:
        s2 = (2 * s).to(dtype)  # exact: doubling only changes the exponent
        layer.pack(q, s2, torch.full_like(s2, 0.5), packing_bitwidth=packing_bitwidth)
    return layer


def make_gemlite_linear(weight, device="cuda", dtype: torch.dtype = torch.bfloat16, repack: bool = False):
    """`make_linear` for the torch transformer: the released gemlite form of `weight` (8-bit packing),
    or gemlite's own packing when `repack` is set or the weight has no gemlite form."""
    if repack or not hasattr(weight, "to_gemlite"):
        return from_lowbit(weight, device=device, dtype=dtype)
    return from_state(dict(weight.to_gemlite()), device=device, dtype=dtype)


def cache_dir() -> Path:
    """User cache for tuned configs: $BONSAI_CACHE, else $XDG_CACHE_HOME/bonsai, else ~/.cache/bonsai."""
    if os.environ.get("BONSAI_CACHE"):
        return Path(os.environ["BONSAI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bonsai"


def autotune_cache_path(directory: str | Path | None = None) -> Path:
    """Per-GPU-model gemlite autotune cache, e.g. ~/.cache/bonsai/gemlite-NVIDIA_H100_80GB_HBM3.json."""
    name = torch.cuda.get_device_name().replace(" ", "_").replace("/", "_")
    return Path(directory or cache_dir()) / f"gemlite-{name}.json"


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
