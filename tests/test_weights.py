"""Whole released folders: written by bonsai.testing, read by bonsai.weights, checked against the libraries that
wrote the real files (mlx, hqq, diffusers, safetensors/torch headers)."""

import datetime
import json

import numpy as np
import pytest
import torch

from bonsai import convert, testing, weights
from bonsai.config import KLEIN_4B
from bonsai.quant import LowBitWeight

CFG = testing.TINY_TRANSFORMER
LAYOUTS = ["gemlite", "mlx", "compact", "unpacked"]
KINDS = ["ternary", "binary"]


def dense(v):
    return v.dequantize(torch.float32) if isinstance(v, LowBitWeight) else v.float()


def assert_same_weights(tensors, ref):
    assert set(tensors) == set(ref)
    for key, value in ref.items():
        got = tensors[key]
        if isinstance(value, LowBitWeight):
            assert isinstance(got, LowBitWeight) and got.kind == value.kind, key
            assert torch.equal(got.packed, value.packed) and torch.equal(got.scales, value.scales), key
        else:
            assert torch.equal(got.float(), value), key


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_reads_back_exactly(tmp_path, layout, kind):
    ref = testing.write_transformer(tmp_path, layout, kind, CFG, seed=3)
    tw = weights.read_transformer(tmp_path)
    assert (tw.layout, tw.kind, tw.config) == (layout, kind, CFG)
    assert_same_weights(tw.tensors, ref)
    assert sum(isinstance(v, LowBitWeight) for v in tw.tensors.values()) == 12 * CFG.num_layers + 2 * CFG.num_single_layers


@pytest.mark.parametrize("kind", KINDS)
def test_gemlite_file_layout(tmp_path, kind):
    testing.write_transformer(tmp_path, "gemlite", kind, CFG)
    folder = tmp_path / f"transformer-gemlite-int{2 if kind == 'ternary' else 1}"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "gemlite_autotune.json", "quantization_config.json",
                                                      "state_dict.pt"]
    state = torch.load(folder / "state_dict.pt", weights_only=True)
    n_lin = len(weights.lowbit_linears(CFG))
    assert len(state) == 5 * n_lin + len(weights.dense_tensors(CFG))
    eps = 4 if kind == "ternary" else 8
    for name, (out, k) in weights.lowbit_linears(CFG).items():
        assert state[f"{name}.W_q"].dtype == torch.uint8 and state[f"{name}.W_q"].shape == (k // eps, out)
        assert state[f"{name}.scales"].dtype == torch.float32 and state[f"{name}.scales"].shape == (k // 128, out)
        assert state[f"{name}.orig_shape"].tolist() == [out, k]
        md = state[f"{name}.metadata"]
        assert md.dtype == torch.int32 and md.tolist()[1:5] == [2 if kind == "ternary" else 1, 128, 3 if kind == "ternary" else 1, eps]
    assert state["x_embedder.weight"].dtype == torch.bfloat16
    assert json.loads((folder / "quantization_config.json").read_text())["bits"] == (2 if kind == "ternary" else 1)


@pytest.mark.parametrize("kind", KINDS)
def test_mlx_pack_decodes_with_mlx_itself(tmp_path, kind):
    mx = pytest.importorskip("mlx.core")
    ref = testing.write_transformer(tmp_path, "mlx", kind, CFG, seed=5)
    arrays = mx.load(str(tmp_path / "transformer-packed-mflux" / "diffusion_pytorch_model.safetensors"))
    bits = 2 if kind == "ternary" else 1
    for name, (out, k) in weights.lowbit_linears(CFG).items():
        w = arrays[f"{name}.weight"]
        assert w.dtype == mx.uint32 and w.shape == (out, k * bits // 32) and arrays[f"{name}.scales"].dtype == mx.bfloat16
        deq = mx.dequantize(w, arrays[f"{name}.scales"], arrays[f"{name}.biases"], group_size=128, bits=bits)
        np.testing.assert_array_equal(np.array(deq.astype(mx.float32)), ref[f"{name}.weight"].dequantize().numpy())
    # Binary: stock mx.quantize(bits=1) of the dense weight writes exactly the released tensors.
    if kind == "binary":
        name = next(iter(weights.lowbit_linears(CFG)))
        wq, s, b = mx.quantize(mx.array(ref[f"{name}.weight"].dequantize().numpy()), group_size=128, bits=1)
        got = LowBitWeight.from_mlx(torch.from_numpy(np.array(wq)), torch.from_numpy(np.array(s)),
                                    torch.from_numpy(np.array(b)), bits=1)
        assert torch.equal(got.codes, ref[f"{name}.weight"].codes)


@pytest.mark.parametrize("kind", KINDS)
def test_unpacked_transformer_loads_in_diffusers(tmp_path, kind):
    diffusers = pytest.importorskip("diffusers")
    ref = testing.write_transformer(tmp_path, "unpacked", kind, CFG, seed=2)
    model = diffusers.Flux2Transformer2DModel.from_pretrained(tmp_path / "transformer", torch_dtype=torch.float32)
    state = model.state_dict()
    assert set(state) == set(ref)
    for key, value in ref.items():
        assert torch.equal(state[key], dense(value)), key


def test_unpacked_that_is_not_low_bit_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    testing.write_transformer(tmp_path, "unpacked", "ternary", CFG)
    file = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    key = "single_transformer_blocks.1.attn.to_out.weight"
    state[key][0, 5] += 0.01
    save_file(state, file)
    with pytest.raises(ValueError, match=f"{key} is not exactly"):
        weights.read_transformer(tmp_path)


def test_vae_layout_matches_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    state = testing.write_vae(tmp_path)
    model = diffusers.AutoencoderKLFlux2.from_pretrained(tmp_path / "vae", torch_dtype=torch.float32)
    ref = model.state_dict()
    assert set(ref) == set(state)
    for key, t in state.items():
        assert ref[key].shape == t.shape and torch.equal(ref[key], t.to(ref[key].dtype)), key


# --- text encoders ---------------------------------------------------------------------------------------------


def tiny_qwen(seed=0, layers=3):
    import transformers

    config = testing.tiny_text_encoder_config(vocab_size=96, layers=layers)
    torch.manual_seed(seed)
    return config, transformers.Qwen3ForCausalLM(config).eval()


def test_hqq_qmodel_written_by_hqq_is_read_exactly(tmp_path):
    """hqq quantizes and saves a tiny Qwen3; our reader's dense weights equal hqq's own dequantization."""
    hqq_models = pytest.importorskip("hqq.models.hf.base")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    config, model = tiny_qwen()
    hqq_models.AutoHQQHFModel.quantize_model(model, quant_config=BaseQuantizeConfig(nbits=4, group_size=64),
                                             compute_dtype=torch.float16, device="cpu")
    out = tmp_path / "text_encoder-hqq-4bit"
    hqq_models.AutoHQQHFModel.save_quantized(model, str(out))
    te_config, state = weights.read_text_encoder(tmp_path)
    assert te_config.num_hidden_layers == 3
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            want = module.dequantize().float()
            torch.testing.assert_close(state[f"{name}.weight"], want, rtol=2e-3, atol=2e-3)
    assert torch.equal(state["model.embed_tokens.weight"], model.model.embed_tokens.weight.float())
    _, cut = weights.read_text_encoder(tmp_path, layers=2)
    assert not any(k.startswith("model.layers.2.") for k in cut) and "model.layers.1.mlp.up_proj.weight" in cut


def test_hqq_text_encoder_kept_4bit_encodes_like_dense(tmp_path):
    """The packed path (Int4Weight + a 4-bit linear per layer) gives the dense path's weights and features."""
    from bonsai.backends.torch.linear import Int4Linear
    from bonsai.backends.torch.text_encoder import encode, load_text_encoder
    from bonsai.quant.qwen4bit import Int4Weight

    config = testing.tiny_text_encoder_config(vocab_size=96, layers=4)
    testing.write_hqq_text_encoder(tmp_path, config, testing.random_text_encoder(config, seed=5))
    cfg, dense = weights.read_text_encoder(tmp_path)
    _, packed = weights.read_text_encoder(tmp_path, packed=True)
    quantized = [k for k, v in packed.items() if isinstance(v, Int4Weight)]
    assert len(quantized) == 7 * 4
    for key in quantized:
        assert packed[key].packed.shape == (dense[key].shape[0], dense[key].shape[1] // 2)
        assert torch.equal(packed[key].dequantize(), dense[key])
    layers = (1, 2, 4)
    ref = load_text_encoder(cfg, dense, layers=layers)
    model = load_text_encoder(cfg, packed, layers=layers, make_linear=Int4Linear)
    assert isinstance(model.layers[0].mlp.up_proj, Int4Linear)
    ids = torch.randint(0, 96, (1, 12))
    mask = torch.ones_like(ids)
    assert torch.equal(encode(model, ids, mask, layers), encode(ref, ids, mask, layers))
    with pytest.raises(ValueError, match="make_linear"):
        load_text_encoder(cfg, packed, layers=layers)


def test_hqq_qmodel_written_by_us_loads_in_hqq(tmp_path):
    hqq_models = pytest.importorskip("hqq.models.hf.base")
    from hqq.core.quantize import HQQLinear

    config = testing.tiny_text_encoder_config(vocab_size=96, layers=2)
    src = testing.random_text_encoder(config, seed=4)
    out = testing.write_hqq_text_encoder(tmp_path, config, src)
    model = hqq_models.AutoHQQHFModel.from_quantized(str(out), compute_dtype=torch.float16, device="cpu")
    _, state = weights.read_text_encoder(tmp_path)
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, HQQLinear):
            torch.testing.assert_close(state[f"{name}.weight"], module.dequantize().float(), rtol=2e-3, atol=2e-3)
            # 4-bit min/max quantization of the source: error within half a step of its group's range.
            assert (state[f"{name}.weight"] - src[f"{name}.weight"]).abs().max() < 0.1
            n += 1
    assert n == 7 * 2


def test_mlx_text_encoder_decodes_with_mlx_itself(tmp_path):
    mx = pytest.importorskip("mlx.core")
    config = testing.tiny_text_encoder_config(vocab_size=128, layers=2)
    src = testing.random_text_encoder(config, seed=6)
    out = testing.write_mlx_text_encoder(tmp_path, config, src)
    _, state = weights.read_text_encoder(tmp_path)
    arrays = mx.load(str(out / "model.safetensors"))
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.q_proj.weight"):
        p = key.removesuffix(".weight")
        s, b = (arrays[f"{p}.{n}"].astype(mx.float32) for n in ("scales", "biases"))  # fp32 math, as our reader
        deq = mx.dequantize(arrays[f"{p}.weight"], s, b, group_size=64, bits=4)
        np.testing.assert_array_equal(np.array(deq.astype(mx.float32)), state[key].numpy())
    # The 4-bit pack approximates the source within half a quantization step.
    err = (state["model.layers.1.mlp.down_proj.weight"] - src["model.layers.1.mlp.down_proj.weight"]).abs().max()
    assert 0 < err < 0.05


# --- checks and errors -----------------------------------------------------------------------------------------


def test_metadata_disagreeing_with_quantization_config(tmp_path):
    testing.write_transformer(tmp_path, "gemlite", "ternary", CFG)
    q = tmp_path / "transformer-gemlite-int2" / "quantization_config.json"
    cfg = json.loads(q.read_text())
    q.write_text(json.dumps({**cfg, "group_size": 64}))
    with pytest.raises(ValueError, match="group_size must be 128"):
        weights.read_transformer(tmp_path)
    q.write_text(json.dumps({**cfg, "bits": 1, "solver": "binary"}))
    with pytest.raises(ValueError, match="disagrees with the folder name"):
        weights.read_transformer(tmp_path)


def test_gemlite_metadata_bits_disagree(tmp_path):
    testing.write_transformer(tmp_path, "gemlite", "ternary", CFG)
    file = tmp_path / "transformer-gemlite-int2" / "state_dict.pt"
    state = torch.load(file, weights_only=True)
    state["transformer_blocks.0.attn.to_k.metadata"][2] = 64
    torch.save(state, file)
    with pytest.raises(ValueError, match=r"to_k\.metadata says 2-bit group 64"):
        weights.read_transformer(tmp_path)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    testing.write_transformer(tmp_path, "gemlite", "binary", CFG)
    file = tmp_path / "transformer-gemlite-int1" / "state_dict.pt"
    state = torch.load(file, weights_only=True)
    del state["proj_out.weight"]
    state["extra.weight"] = torch.zeros(2)
    torch.save(state, file)
    with pytest.raises(ValueError, match=r"state_dict.pt: state dict does not match: missing \['proj_out.weight'\]; unexpected \['extra.weight'\]"):
        weights.read_transformer(tmp_path)


def test_pickle_with_code_is_refused(tmp_path):
    testing.write_transformer(tmp_path, "gemlite", "binary", CFG)
    file = tmp_path / "transformer-gemlite-int1" / "state_dict.pt"
    torch.save({"x": torch.zeros(1), "when": datetime.date(2026, 1, 1)}, file)
    with pytest.raises(ValueError, match="needs code to run.*bonsai loads tensors only"):
        weights.read_transformer(tmp_path)


def test_mlx_bits_must_match_shapes(tmp_path):
    testing.write_transformer(tmp_path, "mlx", "ternary", CFG)
    q = tmp_path / "transformer-packed-mflux" / "quantization_config.json"
    q.write_text(json.dumps({"bits": 1, "group_size": 128}))
    with pytest.raises(ValueError, match="quantization_config.json says 1-bit"):
        weights.read_transformer(tmp_path)


def test_empty_folder_errors_name_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="transformer-gemlite-int2/"):
        weights.read_transformer(tmp_path)
    with pytest.raises(FileNotFoundError, match="text_encoder-hqq-4bit"):
        weights.read_text_encoder(tmp_path)


# --- convert and sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_convert_chain_re_reads_equal(tmp_path, kind):
    src = testing.write_repo(tmp_path / "src", layout="unpacked", kind=kind)
    ref = weights.read_transformer(src).tensors
    prev = src
    for i, to in enumerate(["gemlite", "mlx", "compact", "gemlite"]):
        dst = convert.convert(prev, tmp_path / f"step{i}", to=to)
        tw = weights.read_transformer(dst)
        assert (tw.layout, tw.kind) == (to, kind)
        assert_same_weights(tw.tensors, ref)
        assert (dst / "vae" / "config.json").is_file()
        prev = dst
    with pytest.raises(ValueError, match="--to must be one of"):
        convert.convert(src, tmp_path / "x", to="gguf")


def test_pack_sizes_of_the_real_config():
    """Byte counts of the 4B packs, against the sums in the spec (bonsai-formats.md §2.3, §3.3)."""
    s = weights.pack_sizes(KLEIN_4B)
    assert s["ternary"]["mlx"] == 920_125_440 + 2 * 57_507_840 + 390_085_632
    assert s["binary"]["mlx"] == 460_062_720 + 2 * 57_507_840 + 390_085_632
    assert s["ternary"]["gemlite"] == 1_540_242_432
    assert s["binary"]["gemlite"] == 1_080_179_712
    assert s["ternary"]["unpacked"] == 7_751_089_152  # 3,875,544,576 params x 2 bytes
    assert s["ternary"]["compact"] < 1.25e9
