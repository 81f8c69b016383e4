"""Fuzz (hypothesis) over config.json values and over truncated / bit-flipped weight files of tiny repos of every
layout: every case ends in a loaded model or a one-line BonsaiError that is a ValueError or FileNotFoundError,
never another exception; a damaged weight file never loads (issue 12). Bounded: a deadline per case, few cases."""

from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager
from datetime import timedelta

import pytest

from badfiles import BACKENDS, LAYOUTS, load, weight_files, write_repos
from bonsai import layouts
from bonsai.config import Qwen3Fields, SchedulerConfig, TextEncoderConfig, TransformerConfig, VAEConfig
from bonsai.errors import BonsaiError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

CASES = settings(max_examples=25, deadline=timedelta(seconds=10), derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])
DELETE = "<delete the key>"

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-2, 300) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
) | st.just(DELETE)


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("BONSAI_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield write_repos(tmp_path_factory.mktemp("repos"))
    mp.undo()


@contextmanager
def replaced(file, data: bytes):
    """`file` holds `data` inside the block, its own bytes again afterwards."""
    original = file.read_bytes()
    file.write_bytes(data)
    try:
        yield
    finally:
        file.write_bytes(original)


def outcome(repo, backend, verify=None) -> BonsaiError | None:
    """None if everything a render reads loads; the error if a BonsaiError (ValueError / FileNotFoundError, one
    line) stops it. Any other exception propagates and fails the case."""
    try:
        load(repo, backend, verify)
    except BonsaiError as e:
        assert isinstance(e, (ValueError, FileNotFoundError)), f"{type(e).__name__}: {e}"
        assert "\n" not in str(e), str(e)
        return e
    return None


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


CONFIGS = {  # config file (in which repo) -> the fields bonsai (or the libraries it calls) reads from it
    "transformer": ("gemlite", lambda r: layouts.find_transformer(r)[1] / "config.json", _names(TransformerConfig)),
    "transformer-mlx": ("mlx", lambda r: layouts.find_transformer(r)[1] / "config.json", _names(TransformerConfig)),
    "quantization": ("gemlite", lambda r: layouts.find_transformer(r)[1] / layouts.QUANT_FILE,
                     ["bits", "nbits", "group_size", "solver", "packing_bitwidth"]),
    "vae": ("compact", lambda r: r / "vae" / "config.json", _names(VAEConfig)),
    "scheduler": ("unpacked", lambda r: r / "scheduler" / "scheduler_config.json", _names(SchedulerConfig)),
    "text_encoder-hqq": ("gemlite", lambda r: layouts.find_text_encoder(r)[1] / "config.json",
                         _names(Qwen3Fields) + ["feature_layers", "max_length"]),
    "text_encoder-mlx": ("mlx", lambda r: layouts.find_text_encoder(r)[1] / "config.json",
                         _names(Qwen3Fields) + ["feature_layers", "max_length", "quantization",
                                                "quantization_config"]),
}
assert set(CONFIGS["text_encoder-hqq"][2]) >= set(_names(TextEncoderConfig))


@pytest.mark.parametrize("target", list(CONFIGS))
@CASES
@given(data=st.data())
def test_fuzz_config_values(repos, target, data):
    layout, config_file, fields = CONFIGS[target]
    repo = repos[layout]
    file = config_file(repo)
    field = data.draw(st.sampled_from(fields), label="field")
    value = data.draw(JSON, label="value")
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    d = json.loads(file.read_text())
    if value == DELETE:
        d.pop(field, None)
    else:
        d[field] = value
    with replaced(file, json.dumps(d).encode()):
        err = outcome(repo, backend)
    if err is not None and str(file) in str(err):
        assert field in str(err) or "quantization" in str(err) or "missing" in str(err), str(err)


@CASES
@given(layout=st.sampled_from(LAYOUTS), part=st.sampled_from([0, 1, 2]), at=st.floats(0, 1, exclude_max=True),
       backend=st.sampled_from(BACKENDS))
def test_fuzz_truncated_weight_files(repos, layout, part, at, backend):
    repo = repos[layout]
    file = weight_files(repo)[part]
    data = file.read_bytes()
    with replaced(file, data[: int(at * len(data))]):
        for verify in (False, True):  # the readers catch it without the manifest too
            err = outcome(repo, backend, verify)
            assert err is not None, f"{file} truncated to {int(at * len(data))} of {len(data)} bytes loaded"
            assert str(file) in str(err), str(err)


@CASES
@given(layout=st.sampled_from(LAYOUTS), part=st.sampled_from([0, 1, 2]), at=st.floats(0, 1, exclude_max=True),
       bit=st.integers(0, 7), backend=st.sampled_from(BACKENDS))
def test_fuzz_bit_flipped_weight_files(repos, layout, part, at, bit, backend):
    repo = repos[layout]
    file = weight_files(repo)[part]
    data = bytearray(file.read_bytes())
    data[int(at * len(data))] ^= 1 << bit
    with replaced(file, bytes(data)):
        err = outcome(repo, backend, verify=True)
        assert err is not None and str(file) in str(err), f"{file} with a flipped bit loaded: {err}"
        outcome(repo, backend, verify=False)  # without the hashes: it may load (a flipped mantissa), never crash
