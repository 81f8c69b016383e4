"""bonsai.Pipeline on the MLX backend (MLX-CPU here): same seed, same image as the torch reference backend."""

import numpy as np
import pytest
import torch

pytest.importorskip("mlx.core")

import bonsai  # noqa: E402
from bonsai import testing  # noqa: E402


@pytest.mark.parametrize("layout, kind", [("mlx", "ternary"), ("mlx", "binary"), ("gemlite", "ternary")])
def test_mlx_pipeline_renders_the_torch_image(tmp_path, layout, kind):
    repo = testing.write_repo(tmp_path / "repo", layout=layout, kind=kind, seed=6)
    mlx_pipe = bonsai.Pipeline.from_pretrained(repo, backend="mlx", dtype="float32")
    torch_pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    a = mlx_pipe("a paper boat on a pond", width=80, height=48, seed=9, progress=False)
    b = torch_pipe("a paper boat on a pond", width=80, height=48, seed=9, progress=False)
    diff = np.abs(np.asarray(a.image).astype(int) - np.asarray(b.image).astype(int))
    assert diff.max() <= 2 and a.image.size == (80, 48)
    assert np.asarray(a.image).std() > 1  # a real image, not a constant
    assert a.image.info["bonsai_backend"] == "mlx" and a.image.info["bonsai_variant"] == f"{kind}-{layout}"
    path = tmp_path / "out.png"
    a.save(path)
    assert path.stat().st_size > 0
    mem = a.report.memory
    assert mem["mean_active_gb"] > 0 and mem["gb_s"] > 0 and set(mem["stages"]) == {"encode", "denoise", "decode"}
