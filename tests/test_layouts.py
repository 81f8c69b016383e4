"""The layout registry: every layout through its own writer and reader, names, schemas, detection order, Kind and
gemlite's metadata record."""

import json

import pytest
import torch

from bonsai import convert, layouts, testing
from bonsai.errors import BonsaiValueError
from bonsai.layouts import GemliteMeta, Kind
from bonsai.quant import LowBitWeight

CFG = testing.TINY_TRANSFORMER
N_LINEARS = 12 * CFG.num_layers + 2 * CFG.num_single_layers
N_DENSE = 9 + 4 * CFG.num_layers + 2 * CFG.num_single_layers
NAMES = ["gemlite", "mlx", "compact", "unpacked"]


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("layout", layouts.LAYOUTS, ids=lambda layout: layout.name)
def test_every_layout_round_trips_through_its_writer_and_reader(tmp_path, layout, kind):
    tensors = testing.random_transformer(CFG, kind, seed=7)
    out = layout.write(tmp_path, tensors, CFG, kind)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["config.json", layout.weight_file] + (["quantization_config.json"] if layout.packed else []))
    found, path = layouts.find_transformer(tmp_path)
    assert found is layout and path == out
    assert layout.peek_kind(path, CFG) is Kind(kind)
    got_kind, got, _ = layout.read(path, CFG)
    assert got_kind is Kind(kind)
    assert set(got) == set(tensors)
    for key, ref in tensors.items():
        if isinstance(ref, LowBitWeight):
            assert isinstance(got[key], LowBitWeight) and got[key].kind == kind, key
            assert torch.equal(got[key].packed, ref.packed) and torch.equal(got[key].scales, ref.scales), key
        else:
            assert torch.equal(got[key].float(), ref), key


def test_folder_names_of_the_releases():
    assert layouts.GEMLITE.folder("ternary") == "transformer-gemlite-int2"
    assert layouts.GEMLITE.folder(Kind.BINARY) == "transformer-gemlite-int1"
    assert [layouts.get_layout(n).dirs for n in NAMES] == [
        ("transformer-gemlite-int2", "transformer-gemlite-int1"), ("transformer-packed-mflux",),
        ("transformer-compact",), ("transformer",)]
    assert [(f.name, f.folder, f.weight_file) for f in layouts.TEXT_ENCODERS] == [
        ("hqq", "text_encoder-hqq-4bit", "qmodel.pt"), ("mlx", "text_encoder-mlx-4bit", "model.safetensors"),
        ("dense", "text_encoder", "model.safetensors")]
    assert convert.TARGETS == ("gemlite", "mlx", "compact")


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_quantization_configs_use_the_released_key_names(tmp_path, kind):
    bits = 2 if kind == "ternary" else 1
    released = {"bits": bits, "group_size": 128, "solver": kind, "quantized_count": N_LINEARS, "skipped_count": N_DENSE}
    want = {
        "gemlite": {"format": "gemlite-int2-ternary-g128" if kind == "ternary" else "gemlite-int1-g128", **released,
                    "input_dtype": "fp16", "output_dtype": "fp16"},
        "mlx": released,
        "compact": {"format": "bonsai-compact", "kind": kind, "group_size": 128},
    }
    tensors = testing.random_transformer(CFG, kind)
    for name, q in want.items():
        out = convert.write_transformer(tmp_path / name, tensors, CFG, name, kind)
        assert json.loads((out / "quantization_config.json").read_text()) == q


def test_bad_names_list_the_known_ones(tmp_path):
    with pytest.raises(BonsaiValueError, match=r"layout must be one of \['gemlite', 'mlx', 'compact', 'unpacked'\], "
                                               r"got 'gguf'"):
        layouts.get_layout("gguf")
    with pytest.raises(BonsaiValueError, match=r"layout must be one of .*'unpacked'\], got 'gguf'"):
        layouts.find_transformer(tmp_path, "gguf")
    with pytest.raises(BonsaiValueError, match=r"layout must be one of .*'unpacked'\], got 'gguf'"):
        convert.write_transformer(tmp_path, {}, CFG, "gguf", "ternary")
    with pytest.raises(BonsaiValueError, match=r"text encoder must be one of \['hqq', 'mlx', 'dense'\], got 'gguf'"):
        layouts.get_text_encoder("gguf")


def test_detection_prefers_packed_layouts_in_registry_order(tmp_path):
    for sub in ("transformer", "transformer-compact", "transformer-packed-mflux", "transformer-gemlite-int1"):
        (tmp_path / sub).mkdir()
        found, path = layouts.find_transformer(tmp_path)
        assert (found.name, path.name) == {"transformer": ("unpacked", "transformer"),
                                           "transformer-compact": ("compact", "transformer-compact"),
                                           "transformer-packed-mflux": ("mlx", "transformer-packed-mflux"),
                                           "transformer-gemlite-int1": ("gemlite", "transformer-gemlite-int1")}[sub]
    (tmp_path / "transformer-gemlite-int2").mkdir()
    assert layouts.find_transformer(tmp_path)[1].name == "transformer-gemlite-int2"
    assert layouts.find_transformer(tmp_path, "unpacked")[1].name == "transformer"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="transformer-gemlite-int2/, transformer-gemlite-int1/, "
                                                "transformer-packed-mflux/, transformer-compact/, transformer/"):
        layouts.find_transformer(empty)


def test_text_encoder_detection_order(tmp_path):
    found = []
    for sub in ("text_encoder", "text_encoder-mlx-4bit", "text_encoder-hqq-4bit"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "config.json").write_text("{}")
        found.append(layouts.find_text_encoder(tmp_path)[0].name)
    assert found == ["dense", "mlx", "hqq"]
    with pytest.raises(FileNotFoundError, match="text_encoder-hqq-4bit/config.json"):
        layouts.find_text_encoder(tmp_path / "text_encoder")


def test_a_weight_of_the_other_kind_is_refused(tmp_path):
    tensors = testing.random_transformer(CFG, "binary")
    key = "transformer_blocks.0.attn.to_q.weight"
    tensors[key] = testing.random_transformer(CFG, "ternary")[key]
    with pytest.raises(BonsaiValueError, match=f"{key}: a ternary weight in a binary model"):
        layouts.MLX.write(tmp_path, tensors, CFG, "binary")


def test_kind_is_a_str_enum_with_bits():
    assert Kind("ternary") is Kind.TERNARY and Kind.TERNARY == "ternary" and Kind.BINARY != "ternary"
    assert (Kind.TERNARY.bits, Kind.BINARY.bits) == (2, 1)
    assert Kind.from_bits(1, "x") is Kind.BINARY and Kind.parse("ternary", "x") is Kind.TERNARY
    assert f"{Kind.BINARY}-mlx" == "binary-mlx" and json.dumps({"kind": Kind.TERNARY}) == '{"kind": "ternary"}'
    assert {"ternary": 1}[Kind.TERNARY] == 1
    with pytest.raises(BonsaiValueError, match=r"^where/file: bits must be 2 \(ternary\) or 1 \(binary\), got 4$"):
        Kind.from_bits(4, "where/file")
    with pytest.raises(BonsaiValueError, match="arg: kind must be 'ternary' or 'binary', got 'ternery'"):
        Kind.parse("ternery", "arg")


def test_gemlite_meta_fields_by_name():
    # gemlite's GemLiteLinearTriton.get_meta_args order (bonsai-formats.md section 3.4)
    assert GemliteMeta._fields == ("scaled_activations", "W_nbits", "group_size", "unpack_mask", "elements_per_sample",
                                   "input_dtype", "output_dtype", "acc_dtype", "meta_dtype", "channel_scale_mode",
                                   "W_group_mode", "data_contiguous")
    w = LowBitWeight.from_codes(torch.ones(4, 256, dtype=torch.int8), torch.ones(4, 2), "binary")
    stored = w.to_gemlite()["metadata"]
    assert stored.dtype == torch.int32 and stored.tolist() == [0, 1, 128, 1, 8, 1, 1, 0, 0, 0, 4, 1]
    meta = GemliteMeta.from_tensor(stored)
    assert (meta.W_nbits, meta.group_size, meta.elements_per_sample, meta.W_group_mode) == (1, 128, 8, 4)
    assert torch.equal(meta._replace(input_dtype=2).to_tensor(), torch.tensor([0, 1, 128, 1, 8, 2, 1, 0, 0, 0, 4, 1],
                                                                              dtype=torch.int32))
    with pytest.raises(BonsaiValueError, match="x.metadata: expected 12 gemlite meta args, got 11"):
        GemliteMeta.from_tensor(stored[:11], "x.metadata")


def test_one_gemlite_splitter_names_the_file_and_the_missing_leaf():
    gl = LowBitWeight.from_codes(torch.ones(4, 128, dtype=torch.int8), torch.ones(4, 1), "ternary").to_gemlite()
    state = {**{f"a.{k}": v for k, v in gl.items()}, "a.bias": torch.zeros(4), "b.weight": torch.zeros(2)}
    groups, rest = layouts.split_gemlite_state(state, "dir/state_dict.pt")
    assert list(groups) == ["a"] and sorted(groups["a"]) == sorted(gl) and sorted(rest) == ["a.bias", "b.weight"]
    groups, rest = layouts.split_gemlite_state(state, "dir/state_dict.pt", extra=("bias",))
    assert sorted(groups["a"]) == sorted([*gl, "bias"]) and list(rest) == ["b.weight"]
    del state["a.zeros"]
    with pytest.raises(BonsaiValueError, match=r"^dir/state_dict.pt: a: gemlite linear does not match: "
                                               r"missing \['zeros'\]$"):
        layouts.split_gemlite_state(state, "dir/state_dict.pt")
