"""Corrupt, truncated, malicious and non-finite files of every layout, on the torch and MLX backends: one line naming
the file and the key (issue 12). Also the real-file tolerances (HQQ keys without `model.`, mlx-lm's two
quantization entries) and manifest.json verification."""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import pytest
import torch

from badfiles import (BACKENDS, VAE_FILE, copy_repo, edit_json, edit_tensors, load, one_line_error, read_tensors,
                      text_encoder_file, transformer_file, weight_files, write_repos, write_tensors)
from bonsai import convert, files, hub, testing, weights
from bonsai.errors import BonsaiFileNotFoundError, BonsaiValueError

KEY = "transformer_blocks.0.attn.to_q"  # a low-bit linear of every layout
WIDE = "transformer_blocks.0.ff.linear_out"  # in = 384: three groups of 128 per row


@pytest.fixture(scope="module")
def repos(tmp_path_factory):
    return write_repos(tmp_path_factory.mktemp("repos"))


@pytest.fixture(scope="module")
def binary_repos(tmp_path_factory):
    base = tmp_path_factory.mktemp("binary")
    return {layout: testing.write_repo(base / layout, layout=layout, kind="binary") for layout in ("gemlite", "mlx")}


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "cache"))


def repo_copy(repos, layout, tmp_path):
    return copy_repo(repos[layout], tmp_path / layout)


# --- malicious pickles ------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this creates `marker` (a stand-in for any code a pickle can run)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zip_format", [True, False])
@pytest.mark.parametrize("which", ["transformer", "text encoder"])
def test_malicious_pickle_is_refused_and_never_runs(repos, tmp_path, backend, zip_format, which):
    repo = repo_copy(repos, "gemlite", tmp_path)
    file = transformer_file(repo) if which == "transformer" else text_encoder_file(repo)
    state = torch.load(file, weights_only=True)
    # the payload is real: a plain unpickler runs it
    probe = tmp_path / "probe"
    torch.save({"p": Payload(probe)}, tmp_path / "probe.pt", _use_new_zipfile_serialization=zip_format)
    torch.load(tmp_path / "probe.pt", weights_only=False)
    assert probe.exists()

    marker = tmp_path / "marker"
    torch.save({**state, "payload": Payload(marker)}, file, _use_new_zipfile_serialization=zip_format)
    msg = one_line_error(lambda: load(repo, backend), f"refused: {file} needs code to run", "(pickle global ",
                         "bonsai loads tensors only", expected=BonsaiValueError)
    assert "weights_only" not in msg
    assert not marker.exists()


# --- truncated and unreadable files -----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("part", [0, 1, 2], ids=["transformer", "text_encoder", "vae"])
@pytest.mark.parametrize("layout", ["gemlite", "mlx", "compact", "unpacked"])
def test_truncated_weight_file_is_named(repos, tmp_path, layout, part, backend):
    repo = repo_copy(repos, layout, tmp_path)
    file = weight_files(repo)[part]
    data = file.read_bytes()
    for size in (len(data) // 2, 4, 0):  # 4 bytes: mx.load's "[read] Unable to read 4 bytes"
        file.write_bytes(data[:size])
        one_line_error(lambda: load(repo, backend), str(file), "truncated or corrupt", expected=BonsaiValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_weight_file_is_named(repos, tmp_path, backend):
    repo = repo_copy(repos, "mlx", tmp_path)
    for file in weight_files(repo):
        moved = file.with_name(file.name + ".moved")
        file.rename(moved)  # the text encoder's model.safetensors: its index then names the missing shard
        one_line_error(lambda: load(repo, backend), f"missing file {file}", expected=BonsaiFileNotFoundError)
        moved.rename(file)


@pytest.mark.parametrize("backend", BACKENDS)
def test_index_json_cannot_point_outside_its_folder(repos, tmp_path, backend):
    repo = repo_copy(repos, "mlx", tmp_path)
    file = text_encoder_file(repo)
    index = file.with_name(file.name + ".index.json")
    file.unlink()
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": "../../vae/diffusion_pytorch_model.safetensors"}}))
    one_line_error(lambda: load(repo, backend), str(index), "weight_map['model.norm.weight'] must be a file name")


@pytest.mark.parametrize("content, culprit", [
    (lambda text: text[:200], "tokenizer.json is not valid JSON"),
    (lambda text: json.dumps({**json.loads(text), "model": 5}), "tokenizer.json: not a readable tokenizer"),
])
def test_corrupt_tokenizer_json_is_named(repos, tmp_path, content, culprit):
    repo = repo_copy(repos, "compact", tmp_path)
    file = repo / "tokenizer" / "tokenizer.json"
    file.write_text(content(file.read_text()))
    one_line_error(lambda: load(repo), str(file.parent / culprit), expected=BonsaiValueError)


def test_corrupt_tokenizer_config_is_named(repos, tmp_path):
    repo = repo_copy(repos, "compact", tmp_path)
    file = repo / "tokenizer" / "tokenizer_config.json"
    file.write_bytes(b"\x80\x81")
    one_line_error(lambda: load(repo), f"{file} is not UTF-8 text", expected=BonsaiValueError)


def test_vae_config_missing_a_field_stays_short(repos, tmp_path):
    repo = repo_copy(repos, "compact", tmp_path)
    edit_json(repo / "vae" / "config.json", block_out_channels=...)  # the FLUX.2 default then disagrees with the file
    msg = one_line_error(lambda: load(repo), str(repo / VAE_FILE), "does not match")
    assert len(msg) < 1000


# --- NaN / inf and wrong dtypes -------------------------------------------------------------------------------


def _poison(key, index, value=math.nan):
    def edit(tensors):
        t = tensors[key].clone()
        t[index] = value
        tensors[key] = t

    return edit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["gemlite", "mlx", "compact", "unpacked"])
def test_nan_in_dense_transformer_tensor(repos, tmp_path, layout, backend):
    repo = repo_copy(repos, layout, tmp_path)
    file = transformer_file(repo)
    edit_tensors(file, _poison("x_embedder.weight", (3, 1)))
    one_line_error(lambda: load(repo, backend), str(file), "x_embedder.weight holds NaN or inf (first at [3, 1])",
                   expected=BonsaiValueError)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, key, index", [
    ("gemlite", f"{KEY}.scales", (0, 2)),  # stored [in / 128, out]
    ("gemlite", f"{KEY}.zeros", (0, 2)),
    ("mlx", f"{KEY}.scales", (2, 0)),
    ("mlx", f"{KEY}.biases", (2, 0)),
    ("compact", f"{KEY}.scales", (2, 0)),
    ("unpacked", f"{KEY}.weight", (2, 7)),
])
def test_inf_in_low_bit_scales(repos, tmp_path, layout, key, index, backend):
    repo = repo_copy(repos, layout, tmp_path)
    file = transformer_file(repo)
    edit_tensors(file, _poison(key, index, math.inf))
    one_line_error(lambda: load(repo, backend), str(file), key, "NaN or inf", expected=BonsaiValueError)


def test_nan_in_the_gemlite_state_the_cuda_path_loads_as_stored(repos, tmp_path):
    repo = repo_copy(repos, "gemlite", tmp_path)  # weights.read_gemlite_state feeds gemlite without repacking
    file = transformer_file(repo)
    edit_tensors(file, _poison(f"{KEY}.zeros", (0, 3)))
    one_line_error(lambda: weights.read_gemlite_state(repo), f"{file}: {KEY}.zeros holds NaN or inf (first at [0, 3])")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_vae_tensor(repos, tmp_path, backend):
    repo = repo_copy(repos, "mlx", tmp_path)
    edit_tensors(repo / VAE_FILE, _poison("decoder.conv_in.weight", (0, 0, 1, 1)))
    one_line_error(lambda: load(repo, backend), str(repo / VAE_FILE),
                   "decoder.conv_in.weight holds NaN or inf (first at [0, 0, 1, 1])", expected=BonsaiValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int8_vae_tensor_is_not_cast_silently(repos, tmp_path, backend):
    repo = repo_copy(repos, "gemlite", tmp_path)

    def to_int8(tensors):
        tensors["decoder.conv_in.bias"] = tensors["decoder.conv_in.bias"].to(torch.int8)
        assert tensors["bn.num_batches_tracked"].dtype == torch.int64  # stays allowed: the loads below pass it

    edit_tensors(repo / VAE_FILE, to_int8)
    one_line_error(lambda: load(repo, backend), str(repo / VAE_FILE), "decoder.conv_in.bias must be a float tensor",
                   "int8", expected=BonsaiValueError)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout, key", [
    ("gemlite", "model.layers.1.self_attn.q_proj.scale"),  # HQQ
    ("gemlite", "model.layers.1.self_attn.q_proj.zero"),
    ("gemlite", "model.norm.weight"),  # an HQQ pack's dense leaf
    ("mlx", "model.layers.1.mlp.up_proj.scales"),
    ("mlx", "model.layers.1.mlp.up_proj.biases"),
    ("mlx", "model.layers.1.input_layernorm.weight"),
    ("unpacked", "model.layers.1.mlp.down_proj.weight"),
])
def test_nan_in_text_encoder_tensor(repos, tmp_path, layout, key, backend):
    repo = repo_copy(repos, layout, tmp_path)
    file = text_encoder_file(repo)
    if file.suffix == ".pt":  # {leaf: {name: tensor}}
        qmodel = torch.load(file, weights_only=True)
        leaf, _, name = key.rpartition(".")
        qmodel[leaf][name] = qmodel[leaf][name].clone().fill_(math.nan)
        torch.save(qmodel, file)
    else:
        edit_tensors(file, _poison(key, 0))
    one_line_error(lambda: load(repo, backend), str(file), key, "NaN or inf", expected=BonsaiValueError)


# --- a group breaking the binary / ternary zero rule ----------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["binary", "ternary"])
@pytest.mark.parametrize("layout", ["gemlite", "mlx"])
def test_group_breaking_the_zero_rule_is_named(repos, binary_repos, tmp_path, layout, kind, backend):
    repo = copy_repo((binary_repos if kind == "binary" else repos)[layout], tmp_path / "repo")
    file = transformer_file(repo)
    leaf, index = ("zeros", (1, 5)) if layout == "gemlite" else ("biases", (5, 1))  # gemlite stores [groups, out]

    def break_one_group(tensors):
        t = tensors[f"{WIDE}.{leaf}"].clone()
        t[index] = t[index] * 0.5  # still finite, but no longer -scale (ternary) or -scale / 2 (binary)
        tensors[f"{WIDE}.{leaf}"] = t

    edit_tensors(file, break_one_group)
    rule = "-scales / 2" if kind == "binary" else "-scales"
    one_line_error(lambda: load(repo, backend), str(file), f"{WIDE}.{leaf}: {kind} packs need {leaf} == {rule} ",
                   "row 5, group 1 breaks it", expected=BonsaiValueError)


# --- real-file tolerance ----------------------------------------------------------------------------------------


def _strip_model_prefix(file):
    if file.suffix == ".pt":
        qmodel = torch.load(file, weights_only=True)
        torch.save({k.removeprefix("model."): v for k, v in qmodel.items()}, file)
        return
    tensors, metadata = read_tensors(file)
    write_tensors(file, {k.removeprefix("model."): v for k, v in tensors.items()}, metadata)
    index = file.with_name(file.name + ".index.json")
    if index.is_file():
        index.write_text(json.dumps({"weight_map": {k.removeprefix("model."): file.name for k in tensors}}))


@pytest.mark.parametrize("layout", ["gemlite", "mlx", "unpacked"])  # HQQ (hqq's AutoModel keys), MLX, dense
def test_text_encoder_without_model_prefix_loads_the_same(repos, tmp_path, layout):
    repo = repo_copy(repos, layout, tmp_path)
    file = text_encoder_file(repo)
    keys = list(torch.load(file, weights_only=True)) if file.suffix == ".pt" else list(read_tensors(file)[0])
    assert "layers.0.self_attn.q_proj" not in keys and any(k.startswith("model.layers.0.") for k in keys)
    ref_config, ref = weights.read_text_encoder(repos[layout])
    _strip_model_prefix(file)
    keys = list(torch.load(file, weights_only=True)) if file.suffix == ".pt" else list(read_tensors(file)[0])
    assert not any(k.startswith("model.") for k in keys)  # the edit really removed the prefix
    config, state = weights.read_text_encoder(repo)
    assert config.to_dict() == ref_config.to_dict() and state.keys() == ref.keys()
    assert all(torch.equal(state[k], ref[k]) for k in ref)
    for backend in BACKENDS:
        load(repo, backend)


@pytest.mark.skipif("mlx" not in BACKENDS, reason="mlx is not installed")
def test_mlx_text_encoder_without_model_prefix_loads_natively(repos, tmp_path):
    from mlx.utils import tree_flatten

    from bonsai.backends.mlx.text_encoder import load_text_encoder_folder

    repo = repo_copy(repos, "mlx", tmp_path)
    _strip_model_prefix(text_encoder_file(repo))
    layers = testing.TINY_FEATURE_LAYERS
    got = dict(tree_flatten(load_text_encoder_folder(repo, layers, dtype="float32").parameters()))
    ref = dict(tree_flatten(load_text_encoder_folder(repos["mlx"], layers, dtype="float32").parameters()))
    assert got.keys() == ref.keys() and all((got[k] == ref[k]).all().item() for k in ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mlx_text_encoder_config_with_both_quantization_keys(repos, tmp_path, backend):
    repo = repo_copy(repos, "mlx", tmp_path)
    file = text_encoder_file(repo).parent / "config.json"
    quant = json.loads(file.read_text())["quantization"]
    edit_json(file, quantization_config=dict(quant))  # as mlx-lm writes it
    load(repo, backend)
    config, _ = weights.read_text_encoder(repo)
    assert not hasattr(config, "quantization_config")  # it no longer leaks into transformers' Qwen3Config
    edit_json(file, quantization_config={**quant, "group_size": 32})
    one_line_error(lambda: load(repo, backend), str(file),
                   "quantization and quantization_config disagree on 'group_size': 64 vs 32",
                   expected=BonsaiValueError)


# --- manifest.json ----------------------------------------------------------------------------------------------


def test_write_repo_manifest_lists_every_file(repos):
    repo = repos["mlx"]
    manifest = json.loads((repo / "manifest.json").read_text())
    assert manifest["model_version"] == "ternary g128 (bf16 master)"
    on_disk = sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert [e["path"] for e in manifest["files"]] == on_disk
    for entry in manifest["files"]:
        data = (repo / entry["path"]).read_bytes()
        assert entry["size"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()


def test_verify_manifest_names_the_first_bad_file(repos, tmp_path):
    repo = repo_copy(repos, "gemlite", tmp_path)
    n = len(json.loads((repo / "manifest.json").read_text())["files"])
    assert files.verify_manifest(repo, cache=False) == n
    file = repo / VAE_FILE
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x10
    file.write_bytes(bytes(data))
    one_line_error(lambda: files.verify_manifest(repo), f"{file}: sha256 ", str(repo / "manifest.json"),
                   expected=BonsaiValueError)
    file.write_bytes(bytes(data[:-1]))
    one_line_error(lambda: files.verify_manifest(repo), f"{file}: {len(data) - 1} bytes", f"says {len(data)}")
    file.unlink()  # a listed file that is absent (a download takes one layout's files) is skipped
    assert files.verify_manifest(repo, cache=False) == n - 1


def test_converted_repo_lists_its_own_files(repos, tmp_path):
    dst = convert.convert(repos["gemlite"], tmp_path / "compact", "compact")
    listed = {e["path"] for e in json.loads((dst / "manifest.json").read_text())["files"]}
    assert "transformer-compact/model.safetensors" in listed and not any("gemlite" in p for p in listed)
    assert json.loads((dst / "manifest.json").read_text())["model_version"] == "ternary g128 (bf16 master)"
    files.verify_manifest(dst, cache=False)


@pytest.mark.parametrize("entry, message", [
    ({"path": "../outside", "size": 1, "sha256": "0" * 64}, "files[0].path must be a relative path inside the repo"),
    ({"path": "/etc/passwd", "size": 1, "sha256": "0" * 64}, "files[0].path must be a relative path inside the repo"),
    ({"path": "vae/config.json", "size": "12", "sha256": "0" * 64}, "files[0].size must be a byte count, got '12'"),
    ({"path": "vae/config.json", "size": 12, "sha256": "abc"}, "files[0].sha256 must be 64 hex digits, got 'abc'"),
    ("vae/config.json", "files[0] must be an object"),
])
def test_malformed_manifest_entries(repos, tmp_path, entry, message):
    repo = repo_copy(repos, "compact", tmp_path)
    edit_json(repo / "manifest.json", files=[entry])
    one_line_error(lambda: files.verify_manifest(repo), f"{repo / 'manifest.json'}: {message}",
                   expected=BonsaiValueError)
    edit_json(repo / "manifest.json", files={"vae/config.json": "0" * 64})
    one_line_error(lambda: files.verify_manifest(repo), "files must be a list")


@pytest.mark.parametrize("backend", BACKENDS)
def test_from_pretrained_verify_keyword(repos, tmp_path, backend):
    repo = repo_copy(repos, "unpacked", tmp_path)
    with open(repo / "model_index.json", "a") as f:  # bonsai never reads this file: only the hashes see it
        f.write(" ")
    load(repo, backend)  # a local folder is not hashed by default
    load(repo, backend, verify=False)
    one_line_error(lambda: load(repo, backend, verify=True), str(repo / "model_index.json"), "manifest.json says",
                   expected=BonsaiValueError)


def _settle(folder, age_s=60):
    past = time.time() - age_s
    for p in folder.rglob("*"):
        os.utime(p, (past, past))


def test_verified_files_are_not_hashed_again(repos, tmp_path, monkeypatch):
    repo = repo_copy(repos, "compact", tmp_path)
    _settle(repo, age_s=0)
    n = len(json.loads((repo / "manifest.json").read_text())["files"])
    assert files.verify_manifest(repo) == n and files.verify_manifest(repo) == n  # just written: not cached yet
    _settle(repo)
    assert files.verify_manifest(repo) == n
    assert files.verify_manifest(repo) == 0  # (path, size, mtime) matched before
    assert (tmp_path / "cache" / files.VERIFIED_FILE).is_file()  # under $BONSAI_CACHE
    file = repo / VAE_FILE
    data = bytearray(file.read_bytes())
    data[100] ^= 1
    file.write_bytes(bytes(data))  # a new mtime: hashed again, caught
    one_line_error(lambda: files.verify_manifest(repo), f"{file}: sha256")


def test_hub_download_is_verified_once(repos, tmp_path, monkeypatch):
    import huggingface_hub

    repo = repo_copy(repos, "gemlite", tmp_path)
    _settle(repo)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(repo))
    hashed = []
    real = files.sha256
    monkeypatch.setattr(files, "sha256", lambda f: hashed.append(f) or real(f))
    repo_id = "prism-ml/bonsai-image-ternary-4B-gemlite-2bit"
    listed = json.loads((repo / "manifest.json").read_text())["files"]
    assert hub.resolve(repo_id) == repo and len(hashed) == len(listed)
    hashed.clear()
    assert hub.resolve(repo_id) == repo and hashed == []  # cached: a repeated load does not re-hash
    data = bytearray(text_encoder_file(repo).read_bytes())
    data[-10] ^= 4
    text_encoder_file(repo).write_bytes(bytes(data))
    one_line_error(lambda: hub.resolve(repo_id), f"{text_encoder_file(repo)}: sha256", expected=BonsaiValueError)
    assert hub.resolve(repo_id, verify=False) == repo


def test_cache_dir_is_shared_with_the_cuda_code(monkeypatch, tmp_path):
    from bonsai.backends.cuda import gemlite

    assert gemlite.cache_dir is files.cache_dir
    monkeypatch.setenv("BONSAI_CACHE", str(tmp_path / "c"))
    assert files.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("BONSAI_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert files.cache_dir() == tmp_path / "x" / "bonsai"
