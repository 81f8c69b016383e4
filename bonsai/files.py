"""Every file bonsai reads, through one small wrapper per reader, so that any read error is one line naming the
file: JSON, torch pickles (tensors only), safetensors (torch and MLX) (the tokenizer: `bonsai.tokenizer`). Also
the manifest check (`verify_manifest`) and the user cache folder.

Importing this module imports no torch (bonsai.config and bonsai.layouts use it before any model is loaded).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from .errors import BonsaiFileNotFoundError, BonsaiValueError

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
VERIFIED_FILE = "verified.json"  # under cache_dir(): files whose sha256 matched their manifest
_SETTLED_S = 2.0  # a file modified this recently is hashed again next time (mtime granularity is coarse)
_HASH_CHUNK = 1 << 22


def cache_dir() -> Path:
    """User cache: $BONSAI_CACHE, else $XDG_CACHE_HOME/bonsai, else ~/.cache/bonsai."""
    if os.environ.get("BONSAI_CACHE"):
        return Path(os.environ["BONSAI_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bonsai"


def one_line(e: BaseException) -> str:
    """The exception's first non-empty line (libraries' messages run to many lines)."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _is_file(file: Path, what: str = "file") -> Path:
    file = Path(file)
    if not file.is_file():
        raise BonsaiFileNotFoundError(f"missing {what} {file}")
    return file


# --- JSON -------------------------------------------------------------------------------------------------------


def read_json(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A JSON object from `path`; BonsaiFileNotFoundError if absent, BonsaiValueError naming it if it is not
    UTF-8 JSON holding an object."""
    path = _is_file(Path(path), what)
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BonsaiValueError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BonsaiValueError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise BonsaiValueError(f"{path} is not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise BonsaiValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def shard_files(file: Path) -> list[Path]:
    """`file`, or, when it is absent and `<file>.index.json` exists, the shard files that index's weight_map
    names (plain file names beside it)."""
    file = Path(file)
    index = file.with_name(file.name + ".index.json")
    if file.is_file() or not index.is_file():
        return [file]
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise BonsaiValueError(f"{index}: weight_map must be a non-empty object of key -> file name")
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
            raise BonsaiValueError(f"{index}: weight_map[{key!r}] must be a file name beside the index, got {name!r}")
        names.add(name)
    return [file.with_name(name) for name in sorted(names)]


# --- torch pickles ----------------------------------------------------------------------------------------------


def load_torch_file(file: Path) -> dict:
    """torch.load with weights_only=True (mmap'd where the file allows): a dict of tensors and plain values.

    A pickle that needs code to load is refused, never run; every error is one line naming the file.
    """
    import torch

    file = _is_file(file)
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # a legacy (non-zip) torch.save file
    except Exception as e:  # pickle and zip errors have many types; all mean the same to a user
        text = str(e)
        if "Weights only load failed" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            detail = f"pickle global {found.group(1)}" if found else one_line(e).split(". ")[0]
            raise BonsaiValueError(f"refused: {file} needs code to run to load ({detail}); bonsai loads tensors "
                                   "only") from None
        raise BonsaiValueError(f"{file}: not a readable torch file, truncated or corrupt ({one_line(e)})") from None
    if not isinstance(state, dict):
        raise BonsaiValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


# --- safetensors ------------------------------------------------------------------------------------------------


def read_safetensors(file: Path, device=None) -> dict:
    """One safetensors file (or the shards of its `<file>.index.json`) as torch tensors on `device` (default CPU)."""
    from safetensors.torch import load_file

    tensors = {}
    for f in shard_files(file):
        f = _is_file(f)
        try:
            tensors.update(load_file(f, device=str(device or "cpu")))
        except Exception as e:  # SafetensorError, OSError, or a torch error on a corrupt header
            raise BonsaiValueError(f"{f}: not a readable safetensors file, truncated or corrupt "
                                   f"({one_line(e)})") from None
    return tensors


def load_mlx(file: Path) -> dict:
    """One safetensors file (or the shards of its index) as mx arrays through `mx.load`, errors naming the file."""
    import mlx.core as mx

    arrays = {}
    for f in shard_files(file):
        f = _is_file(f)
        try:
            loaded = mx.load(str(f))
        except Exception as e:  # mx.load raises RuntimeError/ValueError with "[read] Unable to read 4 bytes"
            raise BonsaiValueError(f"{f}: not a readable safetensors file, truncated or corrupt "
                                   f"({one_line(e)})") from None
        if not isinstance(loaded, dict):
            raise BonsaiValueError(f"{f}: expected named tensors, got one array")
        arrays.update(loaded)
    return arrays


def save_tensors(tensors: dict, file: Path) -> None:
    """`.pt`: a torch pickle of the dict (gemlite's state_dict.pt); anything else: safetensors."""
    if file.suffix == ".pt":
        import torch

        torch.save(tensors, file)
    else:
        from safetensors.torch import save_file

        save_file(tensors, file, metadata={"format": "pt"})


# --- manifest ---------------------------------------------------------------------------------------------------


def sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def manifest_entries(folder: Path) -> list[tuple[Path, int, str]]:
    """(file, size, sha256) of each `files` entry of folder/manifest.json ([] without a manifest or a list)."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return []
    listed = read_json(manifest).get("files")
    if listed is None:
        return []
    if not isinstance(listed, list):
        raise BonsaiValueError(f"{manifest}: files must be a list of {{path, size, sha256}}, got "
                               f"{type(listed).__name__}")
    out = []
    for i, entry in enumerate(listed):
        where = f"{manifest}: files[{i}]"
        if not isinstance(entry, dict):
            raise BonsaiValueError(f"{where} must be an object {{path, size, sha256}}, got {type(entry).__name__}")
        rel, size, digest = entry.get("path", entry.get("remote_path")), entry.get("size"), entry.get("sha256")
        parts = Path(rel).parts if isinstance(rel, str) else ()
        if not parts or Path(rel).is_absolute() or ".." in parts:
            raise BonsaiValueError(f"{where}.path must be a relative path inside the repo, got {rel!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BonsaiValueError(f"{where}.size must be a byte count, got {size!r}")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise BonsaiValueError(f"{where}.sha256 must be 64 hex digits, got {digest!r}")
        out.append((folder / rel, size, digest.lower()))
    return out


def write_manifest(folder: str | Path, **fields) -> Path:
    """folder/manifest.json: `fields` (e.g. model_version) and a `files` entry {path, size, sha256} for every
    other file under folder."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_FILE)
    listed = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": sha256(p)} for p in files]
    out = folder / MANIFEST_FILE
    out.write_text(json.dumps({**fields, "files": listed}, indent=2))
    return out


def verify_manifest(folder: str | Path, cache: bool = True) -> int:
    """Check every file that folder/manifest.json lists (and that is present: a download takes one layout's
    files) against its size and sha256; raise BonsaiValueError naming the first file that differs.

    cache: skip files whose (path, size, mtime) already matched (recorded in cache_dir()/verified.json).
    Returns the number of files hashed.
    """
    folder = Path(folder)
    entries = manifest_entries(folder)
    if not entries:
        return 0
    record = _read_verified() if cache else {}
    hashed, changed = 0, False
    for file, size, digest in entries:
        if not file.exists():
            continue
        st = file.stat()
        if st.st_size != size:
            raise BonsaiValueError(f"{file}: {st.st_size} bytes, {folder / MANIFEST_FILE} says {size} (truncated or "
                                   "incomplete download?)")
        key = str(file.resolve())
        if record.get(key) == [size, st.st_mtime_ns, digest]:
            continue
        got = sha256(file)
        hashed += 1
        if got != digest:
            raise BonsaiValueError(f"{file}: sha256 {got} differs from {folder / MANIFEST_FILE} ({digest}); the file "
                                   "is corrupt or was changed")
        if cache and time.time() - st.st_mtime_ns / 1e9 > _SETTLED_S:
            record[key], changed = [size, st.st_mtime_ns, digest], True
    if changed:
        _write_verified(record)
    return hashed


def _read_verified() -> dict:
    try:
        record = json.loads((cache_dir() / VERIFIED_FILE).read_text())
    except (OSError, ValueError):  # no cache yet, or a damaged one: hash again
        return {}
    return record if isinstance(record, dict) else {}


def _write_verified(record: dict) -> None:
    path = cache_dir() / VERIFIED_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old or the new record
    except OSError as e:  # a read-only cache only costs a re-hash next time
        log.debug("cannot record verified files in %s: %s", path, e)
