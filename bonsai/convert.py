"""Writers of the transformer layouts, and `bonsai convert SRC DST --to {gemlite,mlx,compact}`."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from . import weights
from .config import TransformerConfig
from .quant import LowBitWeight

TARGETS = ("gemlite", "mlx", "compact")


def config_json(config: TransformerConfig) -> dict:
    d = {"_class_name": "Flux2Transformer2DModel", **asdict(config)}
    d["axes_dims_rope"] = list(config.axes_dims_rope)
    return d


def quant_config(layout: str, kind: str, n_linears: int, n_dense: int) -> dict:
    """The quantization_config.json of each layout (released key names for gemlite and MLX)."""
    bits = 2 if kind == "ternary" else 1
    if layout == "compact":
        return {"format": weights.COMPACT_FORMAT, "kind": kind, "group_size": weights.GROUP_SIZE}
    q = {"bits": bits, "group_size": weights.GROUP_SIZE, "solver": kind,
         "quantized_count": n_linears, "skipped_count": n_dense}
    if layout == "gemlite":
        fmt = "gemlite-int2-ternary-g128" if kind == "ternary" else "gemlite-int1-g128"
        q = {"format": fmt, **q, "input_dtype": "fp16", "output_dtype": "fp16"}
    return q


def write_transformer(folder: str | Path, tensors: dict, config: TransformerConfig, layout: str, kind: str) -> Path:
    """Write {key: LowBitWeight | tensor} as `layout` into folder/<layout dir>/; returns that directory."""
    if layout not in weights.LAYOUT_DIRS:
        raise ValueError(f"layout must be one of {list(weights.LAYOUT_DIRS)}, got {layout!r}")
    sub = weights.LAYOUT_DIRS[layout][0 if layout != "gemlite" or kind == "ternary" else 1]
    out = Path(folder) / sub
    out.mkdir(parents=True, exist_ok=True)
    flat: dict[str, torch.Tensor] = {}
    n_linears = 0
    for key, value in tensors.items():
        if not isinstance(value, LowBitWeight):
            # Released files keep the non-quantized tensors in 16-bit.
            flat[key] = value.to(torch.bfloat16).contiguous()
            continue
        if value.kind != kind:
            raise ValueError(f"{key}: a {value.kind} weight in a {kind} model")
        n_linears += 1
        prefix = key.removesuffix(".weight")
        if layout == "unpacked":
            flat[key] = value.dequantize(torch.bfloat16)
            continue
        parts = {"gemlite": value.to_gemlite, "mlx": value.to_mlx, "compact": value.to_compact}[layout]()
        flat.update({f"{prefix}.{name}": t for name, t in parts.items()})
    (out / "config.json").write_text(json.dumps(config_json(config), indent=2))
    if layout != "unpacked":
        q = quant_config(layout, kind, n_linears, len(tensors) - n_linears)
        (out / "quantization_config.json").write_text(json.dumps(q, indent=2))
    file = out / weights.WEIGHT_FILES[layout]
    if layout == "gemlite":
        torch.save(flat, file)
    else:
        from safetensors.torch import save_file

        save_file(flat, file, metadata={"format": "pt"})
    return out


# Folders and files a converted repo keeps from its source, besides the transformer.
_KEEP = ("vae", "tokenizer", "scheduler", *weights.TEXT_ENCODER_DIRS.values(),
         "model_index.json", "manifest.json", "README.md", "LICENSE", "NOTICE.md")


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Re-write the transformer of repo `src` in layout `to` under `dst`; the other parts are copied unchanged."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    tw = weights.read_transformer(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in _KEEP:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    write_transformer(dst, tw.tensors, tw.config, to, tw.kind)
    return dst
