"""`bonsai convert SRC DST --to LAYOUT`: re-write a repo's transformer in another layout of `bonsai.layouts`."""

from __future__ import annotations

import shutil
from pathlib import Path

from . import files, layouts
from .config import TransformerConfig
from .errors import BonsaiValueError
from .layouts import config_json  # noqa: F401 (re-exported: bonsai.testing and older callers import it here)

TARGETS = tuple(layout.name for layout in layouts.LAYOUTS if layout.packed)


def write_transformer(folder: str | Path, tensors: dict, config: TransformerConfig, layout: str, kind: str) -> Path:
    """Write {key: LowBitWeight | tensor} as `layout` into folder/<layout dir>/; returns that directory."""
    return layouts.get_layout(layout).write(folder, tensors, config, kind)


# Folders and files a converted repo keeps from its source, besides the transformer.
_KEEP = ("vae", "tokenizer", "scheduler", *(fmt.folder for fmt in layouts.TEXT_ENCODERS),
         "model_index.json", layouts.MANIFEST_FILE, "README.md", "LICENSE", "NOTICE.md")


def convert(src: str | Path, dst: str | Path, to: str) -> Path:
    """Re-write the transformer of repo `src` in layout `to` under `dst`; the other parts are copied unchanged."""
    from . import weights  # imports torch; the CLI reads TARGETS from this module before any model work

    if to not in TARGETS:
        raise BonsaiValueError(f"--to must be one of {', '.join(TARGETS)}, got {to!r}")
    src, dst = Path(src), Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise BonsaiValueError(f"{dst} exists and is not empty; convert writes into a new or empty folder")
    tw = weights.read_transformer(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in _KEEP:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dst / name)
    write_transformer(dst, tw.tensors, tw.config, to, tw.kind)
    manifest = dst / layouts.MANIFEST_FILE
    if manifest.is_file() and "files" in (kept := files.read_json(manifest)):  # list the new files, not the source's
        files.write_manifest(dst, **{k: v for k, v in kept.items() if k != "files"})
    return dst
