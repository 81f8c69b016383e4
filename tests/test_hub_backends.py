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
    with pytest.raises(ValueError, match="x.json"):
        hub.resolve(f)
    with pytest.raises(FileNotFoundError, match="neither an existing"):
        hub.resolve(str(tmp_path / "missing" / "deeper" / "dir"))


def test_hub_offline_repo_id_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="cannot fetch 'prism-ml/bonsai-image-ternary-4B-gemlite-2bit'"):
        hub.resolve("prism-ml/bonsai-image-ternary-4B-gemlite-2bit", local_files_only=True, cache_dir=tmp_path)


COMMON = ["*.json", "vae/*", "tokenizer/*", "scheduler/*"]
HQQ_TE = ["text_encoder-hqq-4bit/*", "text_encoder-hqq-4bit/tokenizer/*"]
PATTERNS = {  # written out here, not taken from bonsai.layouts
    "prism-ml/bonsai-image-ternary-4B-gemlite-2bit":
        COMMON + ["transformer-gemlite-int2/*", "transformer-gemlite-int1/*"] + HQQ_TE,
    "prism-ml/bonsai-image-binary-4B-mlx-1bit": COMMON + ["transformer-packed-mflux/*", "text_encoder-mlx-4bit/*"],
    "prism-ml/bonsai-image-ternary-4B-unpacked": COMMON + ["transformer/*", "text_encoder/*"],
    # a converted repo keeps its source's text encoder, so the compact layout asks for each format
    "someone-mlx/bonsai-image-binary-4B-compact":
        COMMON + ["transformer-compact/*"] + HQQ_TE + ["text_encoder-mlx-4bit/*", "text_encoder/*"],
}


@pytest.fixture
def downloads(monkeypatch, tmp_path):
    """Record the allow_patterns of every snapshot_download call instead of downloading."""
    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs["allow_patterns"]))
        return str(tmp_path)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("repo_id", list(PATTERNS))
def test_hub_downloads_one_layout_named_by_the_repo(downloads, repo_id):
    hub.resolve(repo_id)
    assert downloads == [(repo_id, PATTERNS[repo_id])]


def test_hub_repo_naming_no_layout_downloads_nothing(downloads):
    with pytest.raises(ValueError, match=r"'someone/my-model' names none of the layouts "
                                         r"\['gemlite', 'mlx', 'compact', 'unpacked'\]"):
        hub.resolve("someone/my-model")
    assert downloads == []
    hub.resolve("someone/my-model", layout="unpacked")
    assert downloads == [("someone/my-model", PATTERNS["prism-ml/bonsai-image-ternary-4B-unpacked"])]


@pytest.mark.parametrize("layout", ["gemlite", "mlx", "compact", "unpacked"])
def test_hub_patterns_fetch_what_the_readers_need(tmp_path, layout):
    """Filtered as huggingface_hub filters a repo's file list, the patterns keep a loadable repo."""
    import shutil

    from huggingface_hub.utils import filter_repo_objects

    from bonsai import layouts, testing, weights

    src = testing.write_repo(tmp_path / "src", layout=layout)
    files = sorted(str(p.relative_to(src)) for p in src.rglob("*") if p.is_file())
    kept = list(filter_repo_objects(files, allow_patterns=COMMON + layouts.get_layout(layout).hub_patterns()))
    assert "vae/diffusion_pytorch_model.safetensors" in kept
    dst = tmp_path / "dst"
    for name in kept:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dst / name)
    assert weights.read_transformer(dst).layout == layout
    weights.read_text_encoder(dst)
    weights.tokenizer_dir(dst)
