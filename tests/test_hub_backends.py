import pytest

from bonsai import hub
from bonsai.backends import Backend, resolve


def test_resolve_explicit_and_errors():
    assert resolve("torch") is Backend.TORCH
    assert resolve(Backend.MLX) is Backend.MLX
    with pytest.raises(ValueError, match="backend must be one of"):
        resolve("metal")


def test_resolve_auto_on_cpu_machine(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("bonsai.backends._apple_silicon", lambda: False)
    assert resolve("auto") is Backend.TORCH
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("bonsai.backends._maybe_cuda", lambda: True)
    assert resolve("auto") is Backend.CUDA
    monkeypatch.setattr("bonsai.backends._maybe_cuda", lambda: False)  # a CPU torch build: torch is not imported
    assert resolve("auto") is Backend.TORCH


def test_hub_local_folder_and_bad_ids(tmp_path):
    assert hub.resolve(tmp_path) == tmp_path
    f = tmp_path / "x.json"
    f.write_text("{}")
    with pytest.raises(NotADirectoryError, match="x.json"):
        hub.resolve(f)
    with pytest.raises(FileNotFoundError, match="neither an existing folder"):
        hub.resolve(str(tmp_path / "missing" / "deeper" / "dir"))


def test_hub_offline_repo_id_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot fetch 'prism-ml/bonsai-image-ternary-4B-gemlite-2bit'"):
        hub.resolve("prism-ml/bonsai-image-ternary-4B-gemlite-2bit", local_files_only=True, cache_dir=tmp_path)


def test_hub_patterns_per_flavour():
    assert hub._flavour("prism-ml/bonsai-image-binary-4B-mlx-1bit") == "mlx"
    assert hub._flavour("prism-ml/bonsai-image-ternary-4B-gemlite-2bit") == "gemlite"
    assert hub._flavour("prism-ml/bonsai-image-ternary-4B-unpacked") == "unpacked"
