"""Repo id or folder -> local folder, downloading only the files a backend reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from . import files
from .errors import BonsaiFileNotFoundError, BonsaiValueError
from .layouts import LAYOUTS, TransformerLayout, get_layout

log = logging.getLogger(__name__)

RELEASED_REPOS = (
    "prism-ml/bonsai-image-ternary-4B-gemlite-2bit",
    "prism-ml/bonsai-image-binary-4B-gemlite-1bit",
    "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
    "prism-ml/bonsai-image-binary-4B-mlx-1bit",
    "prism-ml/bonsai-image-ternary-4B-unpacked",
    "prism-ml/bonsai-image-binary-4B-unpacked",
)

_COMMON = ["*.json", "vae/*", "tokenizer/*", "scheduler/*"]
LORA_PATTERNS = ["*.safetensors", "*.json"]


def layout_of_repo(repo_id: str) -> TransformerLayout:
    """The layout a repo id names ("owner/bonsai-image-ternary-4B-mlx-2bit" -> MLX): the first registry layout
    whose "-<name>" is in the repo name."""
    name = repo_id.rpartition("/")[2]
    for layout in LAYOUTS:
        if f"-{layout.name}" in name:
            return layout
    raise BonsaiValueError(f"repo id {repo_id!r} names none of the layouts {[layout.name for layout in LAYOUTS]}; "
                           "pass layout= or download it and pass its folder")


def resolve(repo_id_or_dir: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False, layout: str | None = None, verify: bool | None = None) -> Path:
    """Return a local folder holding the repo.

    A path that exists is used as is. Anything else is treated as a Hugging Face repo id and fetched with
    `huggingface_hub.snapshot_download` (works offline from the HF cache with `local_files_only=True` or
    `HF_HUB_OFFLINE=1`): the common files plus the transformer and text encoder of one layout, `layout` or the
    one the repo name names (`layout_of_repo`).

    verify: check the files that the repo's manifest.json lists against their size and sha256
    (`bonsai.files.verify_manifest`; a file that matched once is not hashed again): None checks a download,
    True a local folder too, False neither. A mismatch raises BonsaiValueError naming the file.
    """
    path = Path(repo_id_or_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise BonsaiValueError(f"{path} is a file; pass the repo folder (the one holding vae/, tokenizer/, ...)")
        if verify:
            files.verify_manifest(path)
        return path
    repo_id = _repo_id(repo_id_or_dir)
    patterns = _COMMON + (get_layout(layout) if layout else layout_of_repo(repo_id)).hub_patterns()
    folder = _download(repo_id, patterns, revision, cache_dir, local_files_only)
    if verify is not False:
        files.verify_manifest(folder)
    return folder


def resolve_lora(repo_id: str, revision: str | None = None, cache_dir: str | None = None,
                 local_files_only: bool = False) -> Path:
    """A LoRA repo id -> the local folder of its .safetensors (and json) files, fetched like a model."""
    return _download(_repo_id(repo_id), LORA_PATTERNS, revision, cache_dir, local_files_only)


def _repo_id(value) -> str:
    repo_id = str(value)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise BonsaiFileNotFoundError(f"{repo_id!r} is neither an existing file or folder nor a Hugging Face repo "
                                      "id (owner/name)")
    return repo_id


def _download(repo_id: str, patterns: list[str], revision, cache_dir, local_files_only) -> Path:
    from huggingface_hub import snapshot_download

    log.info("fetching %s (%s)", repo_id, ", ".join(patterns))
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=local_files_only))
    except Exception as e:  # offline, unknown repo, no cache: one clear message instead of an HTTP traceback
        raise BonsaiFileNotFoundError(f"cannot fetch {repo_id!r} from Hugging Face or the local cache "
                                      f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
