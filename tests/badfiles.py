"""Shared by the bad-file tests: tiny repos of every layout, a full load, file editors and the one-line-error check."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from bonsai import Pipeline, layouts, testing
from bonsai.errors import BonsaiError

LAYOUTS = ("gemlite", "mlx", "compact", "unpacked")
BACKENDS = ("torch", "mlx") if importlib.util.find_spec("mlx") else ("torch",)
VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def write_repos(base: Path, kind: str = "ternary") -> dict[str, Path]:
    """One tiny repo per layout (each with its layout's text encoder), under base."""
    return {layout: testing.write_repo(base / f"{layout}-{kind}", layout=layout, kind=kind) for layout in LAYOUTS}


def copy_repo(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def transformer_file(repo: Path) -> Path:
    layout, folder = layouts.find_transformer(repo)
    return folder / layout.weight_file


def text_encoder_file(repo: Path) -> Path:
    fmt, folder = layouts.find_text_encoder(repo)
    return folder / fmt.weight_file


def weight_files(repo: Path) -> list[Path]:
    """The transformer, text-encoder and VAE weight files of a repo."""
    return [transformer_file(repo), text_encoder_file(repo), repo / VAE_FILE]


def load(folder: Path, backend: str = "torch", verify=None):
    """Everything a render reads: the pipeline (transformer, VAE, tokenizer, configs) and its text encoder (which
    the runtime otherwise loads on the first prompt)."""
    pipe = Pipeline.from_pretrained(folder, backend=backend, verify=verify)
    pipe.runtime.text_encoder.get()
    return pipe


def one_line_error(fn, *culprits, expected=BonsaiError) -> str:
    """Run fn; it must raise `expected` (a BonsaiError that is a ValueError or FileNotFoundError) with a one-line
    message naming every culprit (a file, key or field). Returns the message."""
    with pytest.raises(BonsaiError) as info:
        fn()
    err, msg = info.value, str(info.value)
    assert isinstance(err, expected), f"{type(err).__name__}: {msg}"
    assert isinstance(err, (ValueError, FileNotFoundError)), type(err).__mro__
    assert "\n" not in msg and msg.strip() == msg, msg
    for culprit in culprits:
        assert str(culprit) in msg, f"{culprit!r} not named in: {msg}"
    return msg


def edit_json(file: Path, **changes) -> None:
    """Set keys of a JSON file (a value of `...` deletes the key)."""
    d = json.loads(file.read_text())
    for key, value in changes.items():
        if value is ...:
            d.pop(key, None)
        else:
            d[key] = value
    file.write_text(json.dumps(d))


def read_tensors(file: Path) -> tuple[dict, dict | None]:
    """(tensors, safetensors metadata) of a .pt or .safetensors file, read with the libraries directly."""
    if file.suffix == ".pt":
        return torch.load(file, weights_only=True), None
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def write_tensors(file: Path, tensors: dict, metadata: dict | None = None) -> None:
    if file.suffix == ".pt":
        torch.save(tensors, file)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, file, metadata=metadata)


def edit_tensors(file: Path, edit) -> None:
    """Rewrite a weight file with edit(tensors) applied (in place on the dict)."""
    tensors, metadata = read_tensors(file)
    edit(tensors)
    write_tensors(file, tensors, metadata)
