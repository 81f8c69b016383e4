"""The CUDA fast path's pure-Python parts, on any machine: candidate lists, option checks, the choice cache."""

from __future__ import annotations

import pytest

from bonsai.backends.cuda import choice
from bonsai.backends.cuda.linear import candidates, make_linear_factory


def test_candidates_by_mode_and_m():
    assert candidates("expand", False, 4608) == ["cublas"]
    fused = candidates("fused", False, 4608)
    assert fused and all(c.startswith("fused/") for c in fused)
    assert candidates("auto", False, 4608) == ["cublas"] + fused
    assert all(c.startswith("expand8/") for c in candidates("expand", True, 4608))
    # Small-M configs for small M only, and no fp8 candidate uses cuBLAS (it has no per-group K scales).
    assert set(candidates("fused", False, 1)).isdisjoint(fused)
    assert "cublas" not in candidates("auto", True, 1)


def test_linear_factory_rejects_bad_options():
    with pytest.raises(ValueError, match="linear must be one of"):
        make_linear_factory("marlin")
    with pytest.raises(ValueError, match="activations"):
        make_linear_factory("auto", activations="int8")
    with pytest.raises(ValueError, match="gemlite"):
        make_linear_factory("gemlite", activations="fp8")


def test_choice_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setattr(choice, "_CHOICES", {})
    k = choice.key("bfloat16", 2, 27648, 3072, 4608)
    choice._CHOICES[k] = "fused/128x128x64x4x4"
    path = tmp_path / "gemm.json"
    choice.save(path)
    choice.clear()
    assert choice.get(k) is None
    assert choice.load(path) and choice.get(k) == "fused/128x128x64x4x4"
    assert not choice.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    assert not choice.load(tmp_path / "bad.json")  # an unreadable cache is ignored, not fatal
