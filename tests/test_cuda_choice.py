"""The CUDA fast path's pure-Python parts, on any machine: candidate lists, option checks, the GEMM choice table
and its JSON file (records by field, tolerant reading)."""

from __future__ import annotations

import dataclasses
import json
import logging
import re

import pytest

from bonsai.backends.cuda.choice import GemmChoice, GemmChoices, GemmKey
from bonsai.backends.cuda.linear import Workspace, candidates, make_linear_factory
from bonsai.errors import BonsaiValueError


def test_candidates_by_mode_and_m():
    assert candidates("expand", False, 4608) == ["cublas"]
    fused = candidates("fused", False, 4608)
    assert fused and all(c.startswith("fused/") for c in fused)
    assert candidates("auto", False, 4608) == ["cublas"] + fused
    # fp8: cuBLAS's block-scaled GEMM where it exists (Hopper), else our fused GEMM only.
    assert candidates("expand", True, 4608, blockwise=True) == ["cublas8"]
    assert candidates("auto", True, 4608, blockwise=True) == ["cublas8"] + fused
    assert candidates("expand", True, 4608) == fused[:1] and candidates("auto", True, 4608) == fused
    # Small-M configs for small M only, and no fp8 candidate uses the bf16 cuBLAS GEMM.
    assert set(candidates("fused", False, 1)).isdisjoint(fused)
    assert "cublas" not in candidates("auto", True, 1, blockwise=True)


def test_linear_factory_rejects_bad_options():
    with pytest.raises(ValueError, match="linear must be one of"):
        make_linear_factory("marlin")
    with pytest.raises(ValueError, match="activations"):
        make_linear_factory("auto", activations="int8")
    with pytest.raises(ValueError, match="gemlite"):
        make_linear_factory("gemlite", activations="fp8")
    # Our linears share the runtime's state: without it the factory refuses (no hidden module-level default).
    with pytest.raises(BonsaiValueError, match="workspace= and choices="):
        make_linear_factory("auto")
    with pytest.raises(BonsaiValueError, match="workspace= and choices="):
        make_linear_factory("fused", workspace=Workspace("cpu"))


def test_gemm_key_fields():
    assert [f.name for f in dataclasses.fields(GemmKey)] == ["linear", "activations", "bits", "n", "k", "m"]
    assert [f.name for f in dataclasses.fields(GemmChoice)] == ["key", "impl", "times_ms"]
    a, b = GemmKey("auto", "bfloat16", 2, 3072, 3072, 4608), GemmKey("fused", "bfloat16", 2, 3072, 3072, 4608)
    table = GemmChoices([GemmChoice(a, "cublas")])
    assert table.get(a) == "cublas" and table.get(b) is None  # the mode is part of the key
    assert table.get(GemmKey("auto", "bfloat16", 2, 3072, 3072, 4608)) == "cublas"  # equal fields, equal key


def test_choice_file_round_trip_by_field(tmp_path):
    k1 = GemmKey("auto", "bfloat16", 2, 27648, 3072, 4608)
    k2 = GemmKey("auto", "fp8", 1, 3072, 12288, 64)
    table = GemmChoices()
    assert not table.unsaved
    table.add(GemmChoice(k1, "fused/128x128x64x4x4", (("cublas", 0.5), ("fused/128x128x64x4x4", 0.25))))
    table.add(GemmChoice(k2, "cublas8"))
    assert table.unsaved and len(table) == 2
    path = tmp_path / "gemm.json"
    table.save(path)
    assert not table.unsaved
    # The file is a list of records with named fields, written out here by hand (not by the code under test).
    data = json.loads(path.read_text())
    assert data["version"] == 1
    assert sorted(data["choices"], key=lambda e: e["n"]) == [
        {"linear": "auto", "activations": "fp8", "bits": 1, "n": 3072, "k": 12288, "m": 64,
         "impl": "cublas8", "times_ms": {}},
        {"linear": "auto", "activations": "bfloat16", "bits": 2, "n": 27648, "k": 3072, "m": 4608,
         "impl": "fused/128x128x64x4x4", "times_ms": {"cublas": 0.5, "fused/128x128x64x4x4": 0.25}},
    ]
    fresh = GemmChoices()
    assert fresh.load(path)
    assert fresh.get(k1) == "fused/128x128x64x4x4" and fresh.get(k2) == "cublas8"
    assert fresh.records() == table.records()
    assert not fresh.unsaved  # loaded choices are already on disk


def test_choice_file_written_by_hand_is_read_by_field(tmp_path):
    path = tmp_path / "gemm.json"
    # Field order differs from the dataclass and times_ms is left out: records are read by name.
    path.write_text(json.dumps({"version": 1, "choices": [
        {"impl": "cublas", "m": 1536, "k": 3072, "n": 9216, "bits": 2, "activations": "float16", "linear": "auto"}]}))
    table = GemmChoices()
    assert table.load(path)
    assert table.get(GemmKey("auto", "float16", 2, 9216, 3072, 1536)) == "cublas"
    assert table.records()[0].times_ms == ()


@pytest.mark.parametrize("content, reason", [
    ("{not json", "Expecting property name"),
    # The format before choices were records: "activations:bits:n:k:m" -> impl.
    (json.dumps({"bfloat16:2:27648:3072:4608": "cublas"}), "not a version 1"),
    (json.dumps({"version": 2, "choices": []}), "not a version 1"),
    (json.dumps([{"impl": "cublas"}]), "not a version 1"),
    (json.dumps({"version": 1, "choices": {"a": 1}}), "'choices' must be a list"),
    (json.dumps({"version": 1, "choices": [{"linear": "auto", "activations": "bfloat16", "bits": 2, "n": 8,
                                            "k": 128, "impl": "cublas"}]}), r"choices\[0\]: .*missing fields \['m'\]"),
    (json.dumps({"version": 1, "choices": [{"linear": "auto", "activations": "bfloat16", "bits": "2", "n": 8,
                                            "k": 128, "m": 4, "impl": "cublas"}]}), "field 'bits': expected int"),
    (json.dumps({"version": 1, "choices": [{"linear": "auto", "activations": "bfloat16", "bits": True, "n": 8,
                                            "k": 128, "m": 4, "impl": "cublas"}]}), "field 'bits': expected int"),
    (json.dumps({"version": 1, "choices": [{"linear": "auto", "activations": "bfloat16", "bits": 2, "n": 8,
                                            "k": 128, "m": 4, "impl": "cublas", "gpu": "H200"}]}),
     r"unknown fields \['gpu'\]"),
    (json.dumps({"version": 1, "choices": [{"linear": "auto", "activations": "bfloat16", "bits": 2, "n": 8,
                                            "k": 128, "m": 4, "impl": "cublas", "times_ms": {"cublas": "fast"}}]}),
     "field 'times_ms'"),
])
def test_bad_or_old_choice_file_is_ignored_with_a_warning(tmp_path, caplog, content, reason):
    key = GemmKey("auto", "bfloat16", 2, 8, 128, 4)
    table = GemmChoices([GemmChoice(key, "fused/16x128x128x4x4")])
    path = tmp_path / "gemm.json"
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="bonsai.backends.cuda.choice"):
        assert not table.load(path)
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert str(path) in message and "\n" not in message
    assert re.search(reason, message), message
    # Nothing of the bad file was taken: the table keeps what it had.
    assert table.records() == [GemmChoice(key, "fused/16x128x128x4x4")]


def test_missing_choice_file_is_skipped_quietly(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert not GemmChoices().load(tmp_path / "missing.json")
    assert not caplog.records


def test_two_tables_are_independent():
    key = GemmKey("auto", "bfloat16", 2, 8, 128, 4)
    a, b = GemmChoices(), GemmChoices()
    a.add(GemmChoice(key, "cublas"))
    assert a.get(key) == "cublas" and b.get(key) is None and not b.unsaved
    a.clear()
    assert a.get(key) is None and len(a) == 0
