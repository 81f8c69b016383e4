"""Repo id or folder -> local folder, downloading only the files a backend reads."""

from __future__ import annotations

import logging
import os
from pathlib import Path

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

# Which folders each backend reads, per repo flavour. A backend that cannot read a flavour's native
# text encoder still gets it: weights.py dequantizes either 4-bit format on load.
_PATTERNS = {
    "gemlite": ["transformer-gemlite-*/*", "text_encoder-hqq-4bit/*", "text_encoder-hqq-4bit/tokenizer/*"],
    "mlx": ["transformer-packed-mflux/*", "text_encoder-mlx-4bit/*"],
    "unpacked": ["transformer/*", "text_encoder/*"],
}


def _flavour(repo_id: str) -> str:
    for flavour in ("gemlite", "mlx", "unpacked"):
        if f"-{flavour}" in repo_id:
            return flavour
    return ""


def resolve(repo_id_or_dir: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
            local_files_only: bool = False) -> Path:
    """Return a local folder holding the repo.

    A path that exists is used as is. Anything else is treated as a Hugging Face repo id and fetched with
    `huggingface_hub.snapshot_download` (works offline from the HF cache with `local_files_only=True` or
    `HF_HUB_OFFLINE=1`).
    """
    path = Path(repo_id_or_dir).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{path} is a file; pass the repo folder (the one holding vae/, tokenizer/, ...)")
        return path
    repo_id = str(repo_id_or_dir)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{repo_id!r} is neither an existing folder nor a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download

    patterns = _COMMON + _PATTERNS.get(_flavour(repo_id), sum(_PATTERNS.values(), []))
    log.info("fetching %s (%s)", repo_id, ", ".join(patterns))
    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=patterns,
                                      local_files_only=local_files_only))
    except Exception as e:  # offline, unknown repo, no cache: one clear message instead of an HTTP traceback
        raise FileNotFoundError(f"cannot fetch {repo_id!r} from Hugging Face or the local cache "
                                f"({type(e).__name__}: {e})") from None
