"""Tensor files read and written with errors that name the file: torch pickles (tensors only) and safetensors."""

from __future__ import annotations

from pathlib import Path

import torch

from .config import read_json
from .errors import BonsaiFileNotFoundError, BonsaiValueError


def load_torch_file(file: Path) -> dict:
    """torch.load with weights_only=True (a pickle that needs code to load is refused), errors naming the file."""
    if not file.is_file():
        raise BonsaiFileNotFoundError(f"missing {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors have many types; all mean the same to a user
        raise BonsaiValueError(f"{file}: cannot be read as a tensors-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise BonsaiValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


def read_safetensors(file: Path, device=None) -> dict[str, torch.Tensor]:
    """One safetensors file, or the shards its `<file>.index.json` names when the file itself is absent; the
    tensors are read straight onto `device` (default CPU)."""
    from safetensors.torch import load_file

    files = [file]
    index = file.with_name(file.name + ".index.json")
    if not file.is_file() and index.is_file():
        files = sorted({file.with_name(f) for f in read_json(index)["weight_map"].values()})
    tensors = {}
    for f in files:
        if not f.is_file():
            raise BonsaiFileNotFoundError(f"missing {f}")
        try:
            tensors.update(load_file(f, device=str(device or "cpu")))
        except Exception as e:
            raise BonsaiValueError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def save_tensors(tensors: dict[str, torch.Tensor], file: Path) -> None:
    """`.pt`: a torch pickle of the dict (gemlite's state_dict.pt); anything else: safetensors."""
    if file.suffix == ".pt":
        torch.save(tensors, file)
    else:
        from safetensors.torch import save_file

        save_file(tensors, file, metadata={"format": "pt"})
