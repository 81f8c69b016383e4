"""LoRA reading against diffusers' Flux2 LoRA loader + peft: the same file gives the same weight updates."""

import json

import pytest
import torch
from safetensors.torch import save_file

from bonsai import lora as bl
from bonsai import testing
from bonsai.errors import BonsaiFileNotFoundError, BonsaiValueError

diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
from diffusers import Flux2KleinPipeline  # noqa: E402

TC = testing.TINY_TRANSFORMER
D, F = TC.inner_dim, TC.mlp_hidden_dim


def tiny_transformer():
    torch.manual_seed(0)
    return diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=TC.in_channels, num_layers=TC.num_layers, num_single_layers=TC.num_single_layers,
        attention_head_dim=TC.attention_head_dim, num_attention_heads=TC.num_attention_heads,
        joint_attention_dim=TC.joint_attention_dim, timestep_guidance_channels=TC.timestep_guidance_channels,
        mlp_ratio=TC.mlp_ratio, axes_dims_rope=TC.axes_dims_rope, rope_theta=TC.rope_theta, eps=TC.eps,
        guidance_embeds=False).eval()


def diffusers_deltas(path) -> dict[str, torch.Tensor]:
    """Load `path` with Flux2KleinPipeline's own LoRA loader into a fresh model; peft's delta weight per module."""
    from peft.tuners.lora import LoraLayer

    transformer = tiny_transformer()
    state, metadata = Flux2KleinPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    Flux2KleinPipeline.load_lora_into_transformer(state, transformer=transformer, metadata=metadata)
    return {name: m.get_delta_weight(m.active_adapters[0]).float()
            for name, m in transformer.named_modules() if isinstance(m, LoraLayer)}


def assert_same_deltas(ours: bl.Lora, theirs: dict):
    assert sorted(ours.layers) == sorted(theirs)
    for name, layer in ours.layers.items():
        expected = theirs[name].double()
        err = ((layer.delta().double() - expected).norm() / expected.norm()).item()
        assert err <= 1e-6, (name, err)


def close(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item() <= 1e-6


def rand(*shape, seed=0, scale=0.1):
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- the three key styles, against diffusers --------------------------------------------------------------------


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_lora_saved_by_diffusers(tmp_path, rslora):
    """A peft LoRA on every linear, saved by save_lora_weights with its LoraConfig (alpha, rank/alpha patterns)."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    targets = list(bl.lora_targets(TC))
    assert len(targets) == 12 * TC.num_layers + 2 * TC.num_single_layers + 9  # 8 attention + 4 MLP; 2; 9 dense
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                        rank_pattern={"proj_out": 2, "single_transformer_blocks.1.attn.to_qkv_mlp_proj": 6},
                        alpha_pattern={"x_embedder": 3, "transformer_blocks.0.ff.linear_in": 1.5})
    model = tiny_transformer()
    model.add_adapter(config)
    Flux2KleinPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(model),
                                         transformer_lora_adapter_metadata=config.to_dict())
    ours = bl.read_lora(tmp_path, TC)  # the folder: its pytorch_lora_weights.safetensors
    assert ours.style == "diffusers" and ours.source.endswith(bl.PREFERRED_FILE)
    assert ours.layers["proj_out"].rank == 2 and ours.layers["transformer_blocks.0.attn.to_q"].rank == 4
    expected_scale = 8 / (4 ** 0.5 if rslora else 4)
    assert ours.layers["transformer_blocks.0.attn.to_q"].scale == pytest.approx(expected_scale)
    assert_same_deltas(ours, diffusers_deltas(tmp_path / bl.PREFERRED_FILE))


def test_peft_lora_without_metadata_has_scale_one(tmp_path):
    state = {f"transformer.{m}.lora_A.weight": rand(3, TC.inner_dim, seed=i) for i, m in
             enumerate(["transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_out"])}
    state["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"] = rand(3, D, seed=1)
    state["transformer.single_transformer_blocks.0.attn.to_out.lora_A.weight"] = rand(5, D + F, seed=2)
    state["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"] = rand(D, 3, seed=3)
    state["transformer.single_transformer_blocks.0.attn.to_out.lora_B.weight"] = rand(D, 5, seed=4)
    save_file(state, tmp_path / "plain.safetensors")
    ours = bl.read_lora(tmp_path / "plain.safetensors", TC)
    assert {layer.scale for layer in ours.layers.values()} == {1.0}
    assert_same_deltas(ours, diffusers_deltas(tmp_path / "plain.safetensors"))


def kohya_state(sparse_qkv: bool):
    """Every kohya module diffusers' Flux2 converter knows, ranks 6 and 4, alphas on some modules."""
    state, seed = {}, 0
    modules = {"lora_unet_double_blocks_0_img_attn_qkv": (3 * D, D),
               "lora_unet_double_blocks_0_txt_attn_qkv": (3 * D, D),
               "lora_unet_double_blocks_0_img_attn_proj": (D, D), "lora_unet_double_blocks_0_txt_attn_proj": (D, D),
               "lora_unet_double_blocks_0_img_mlp_0": (2 * F, D), "lora_unet_double_blocks_0_img_mlp_2": (D, F),
               "lora_unet_double_blocks_0_txt_mlp_0": (2 * F, D), "lora_unet_double_blocks_0_txt_mlp_2": (D, F),
               "lora_unet_img_in": (D, TC.in_channels), "lora_unet_txt_in": (D, TC.joint_attention_dim),
               "lora_unet_time_in_in_layer": (D, TC.timestep_guidance_channels), "lora_unet_time_in_out_layer": (D, D),
               "lora_unet_final_layer_linear": (TC.out_dim, D)}
    for i in range(TC.num_single_layers):
        modules[f"lora_unet_single_blocks_{i}_linear1"] = (3 * D + 2 * F, D)
        modules[f"lora_unet_single_blocks_{i}_linear2"] = (D, D + F)
    for j, (name, (out, k)) in enumerate(modules.items()):
        r = 6 if j % 2 == 0 else 4
        state[f"{name}.lora_down.weight"] = rand(r, k, seed=seed)
        up = rand(out, r, seed=seed + 1)
        if sparse_qkv and name.endswith("img_attn_qkv"):  # block-diagonal: q, k, v each use their own 2 ranks
            mask = torch.zeros(out, r)
            for p in range(3):
                mask[p * D:(p + 1) * D, 2 * p:2 * p + 2] = 1
            up = up * mask
        state[f"{name}.lora_up.weight"] = up
        if j % 3 != 2:
            state[f"{name}.alpha"] = torch.tensor(float(2 + j % 5))
        seed += 2
    return state


@pytest.mark.parametrize("sparse_qkv", [False, True])
def test_kohya_lora(tmp_path, sparse_qkv):
    save_file(kohya_state(sparse_qkv), tmp_path / "k.safetensors")
    ours = bl.read_lora(tmp_path / "k.safetensors", TC)
    assert ours.style == "kohya"
    q = ours.layers["transformer_blocks.0.attn.to_q"]
    assert q.rank == (2 if sparse_qkv else 6)  # the sparse split keeps each projection's own ranks only
    assert q.scale == pytest.approx(2 / 6)  # alpha / rank of the fused module in the file
    assert_same_deltas(ours, diffusers_deltas(tmp_path / "k.safetensors"))


@pytest.mark.parametrize("prefix", ["diffusion_model.", "base_model.model."])
def test_bfl_named_lora(tmp_path, prefix):
    """ai-toolkit / PEFT dumps of the BFL model: double_blocks/single_blocks names, and expanded diffusers names."""
    state = {}
    for j, (name, (out, k)) in enumerate({"double_blocks.0.img_attn.qkv": (3 * D, D),
                                          "double_blocks.0.txt_attn.proj": (D, D),
                                          "double_blocks.0.txt_mlp.0": (2 * F, D),
                                          "single_blocks.1.linear1": (3 * D + 2 * F, D),
                                          "single_blocks.0.linear2": (D, D + F),
                                          "final_layer.adaLN_modulation.1": (2 * D, D),
                                          "double_stream_modulation_img.lin": (6 * D, D),
                                          "sformer_blocks.0.attn.add_k_proj": (D, D),
                                          "single_transformer_blocks.1.attn.to_out": (D, D + F)}.items()):
        state[f"{prefix}{name}.lora_A.weight"] = rand(4, k, seed=2 * j)
        state[f"{prefix}{name}.lora_B.weight"] = rand(out, 4, seed=2 * j + 1)
    save_file(state, tmp_path / "a.safetensors")
    ours = bl.read_lora(tmp_path / "a.safetensors", TC)
    assert ours.style == "bfl"
    assert "transformer_blocks.0.attn.add_k_proj" in ours.layers and "norm_out.linear" in ours.layers
    assert_same_deltas(ours, diffusers_deltas(tmp_path / "a.safetensors"))

    # lora_down/lora_up spellings (diffusers mistakes these for kohya files) read the same.
    renamed = {k.replace("lora_A", "lora_down").replace("lora_B", "lora_up"): v for k, v in state.items()}
    save_file(renamed, tmp_path / "b.safetensors")
    again = bl.read_lora(tmp_path / "b.safetensors", TC)
    assert all(torch.equal(again.layers[n].delta(), ours.layers[n].delta()) for n in ours.layers)


# --- beyond diffusers: float64 references -----------------------------------------------------------------------


def test_alpha_keys_and_modulation_modules_in_every_style(tmp_path):
    down, up = rand(4, D, seed=1, scale=1.0), rand(6 * D, 4, seed=2, scale=1.0)
    expected = (3.0 / 4) * (up.double() @ down.double())
    for name in ("transformer.double_stream_modulation_txt.linear", "lora_unet_double_stream_modulation_txt_lin",
                 "diffusion_model.double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"):
        kohya = name.startswith("lora_unet_")
        a, b = (".lora_down.weight", ".lora_up.weight") if kohya else (".lora_A.weight", ".lora_B.weight")
        state = {name + a: down, name + b: up, name + ".alpha": torch.tensor(3.0)}
        layer = bl.convert_lora(state, TC).layers["double_stream_modulation_txt.linear"]
        assert close(layer.delta(), expected)
        bf16 = bl.convert_lora({k: v.bfloat16() for k, v in state.items()}, TC).layers
        assert bf16["double_stream_modulation_txt.linear"].down.dtype == torch.float32


def test_fused_qkv_split_keeps_the_product():
    down, up = rand(6, D, seed=3, scale=1.0), rand(3 * D, 6, seed=4, scale=1.0)
    layers = bl.convert_lora({"diffusion_model.double_blocks.0.txt_attn.qkv.lora_A.weight": down,
                              "diffusion_model.double_blocks.0.txt_attn.qkv.lora_B.weight": up}, TC).layers
    full = up.double() @ down.double()
    for i, n in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        assert close(layers[f"transformer_blocks.0.attn.{n}"].delta(), full[i * D:(i + 1) * D])


# --- bad files --------------------------------------------------------------------------------------------------


def good():
    return {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rand(4, D),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rand(D, 4)}


@pytest.mark.parametrize("change, match", [
    (lambda s: s.update({"transformer.transformer_blocks.5.attn.to_q.lora_A.weight": rand(4, D)}),
     r"keys match no layer of the FLUX.2 \[klein\] transformer \(1\+2 blocks\): "
     r"\['transformer.transformer_blocks.5.attn.to_q.lora_A.weight'\]"),
    (lambda s: s.update({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": rand(4, D)}),
     "keys match no layer"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": rand(4, D + 1)}),
     r"transformer_blocks.0.attn.to_q is a LoRA for \[out=128, in=129\], but transformer_blocks.0.attn.to_q is "
     r"\[out=128, in=128\]"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rand(D, 3)}),
     "must be \\[rank, in\\] and \\[out, rank\\] with the same rank"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_B.weight": rand(D, 4, 1, 1)}),
     "with the same rank"),
    (lambda s: s["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"].__setitem__((3, 1), float("nan")),
     "transformer.transformer_blocks.0.attn.to_q.lora_B.weight has non-finite values"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(float("inf"))}),
     "alpha has non-finite values"),
    (lambda s: s.pop("transformer.transformer_blocks.0.attn.to_q.lora_B.weight"),
     "transformer_blocks.0.attn.to_q has no up weight"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": rand(D)}),
     "DoRA is not supported, only plain LoRA"),
    (lambda s: s.update({"transformer_blocks.0.attn.to_q.lora_A.weight": rand(4, D)}),
     "are the same down of transformer_blocks.0.attn.to_q"),
    (lambda s: s.update({"transformer.transformer_blocks.0.attn.to_k.lokr_w1": rand(4, D)}), "LoKr is not supported"),
    (lambda s: s.update({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": rand(4, D),
                         "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": rand(D, 4)}),
     r"mixes LoRA key styles \['diffusers', 'kohya'\]"),
])
def test_bad_loras_name_file_and_keys(change, match):
    state = good()
    change(state)
    with pytest.raises(BonsaiValueError, match=f"^my.safetensors: .*{match}"):
        bl.convert_lora(state, TC, "my.safetensors")


def test_two_names_for_one_layer():
    state = {f"diffusion_model.{m}.{p}": rand(*shape) for m in ("double_blocks.0.img_attn.proj",
                                                             "transformer_blocks.0.attn.to_out.0")
             for p, shape in (("lora_A.weight", (4, D)), ("lora_B.weight", (D, 4)))}
    with pytest.raises(BonsaiValueError, match="transformer_blocks.0.attn.to_out.0 is updated twice"):
        bl.convert_lora(state, TC)


@pytest.mark.parametrize("keys, match", [
    (["text_encoder.model.layers.0.self_attn.q_proj.lora_A.weight"], "looks like a text-encoder LoRA"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "looks like a text-encoder LoRA"),
    (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], "looks like an SD/SDXL UNet LoRA"),
    (["transformer.down_blocks.0.attentions.0.to_q.lora_A.weight"], "looks like an SD/SDXL UNet LoRA"),
    (["foo.bar"], r"has keys \['foo.bar'\]"),
])
def test_other_models_loras(keys, match):
    with pytest.raises(BonsaiValueError, match=f"not a LoRA for the FLUX.2 \\[klein\\] transformer: no transformer "
                                               f"keys; it {match}"):
        bl.convert_lora({k: rand(4, 8) for k in keys}, TC, "x.safetensors")


def test_metadata_rank_must_match(tmp_path):
    meta = {bl.METADATA_KEY: json.dumps({"transformer.r": 8, "transformer.lora_alpha": 8})}
    save_file(good(), tmp_path / "m.safetensors", metadata=meta)
    with pytest.raises(BonsaiValueError, match="to_q has rank 4, but the saved LoraConfig says r=8"):
        bl.read_lora(tmp_path / "m.safetensors", TC)


def test_files_and_folders(tmp_path):
    with pytest.raises(BonsaiFileNotFoundError, match="neither a file nor a folder"):
        bl.read_lora(tmp_path / "nope", TC)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BonsaiValueError, match="must hold one .safetensors file, found none"):
        bl.read_lora(tmp_path / "empty", TC)
    save_file(good(), tmp_path / "a.safetensors")
    save_file(good(), tmp_path / "b.safetensors")
    save_file(good(), tmp_path / "optimizer.safetensors")
    with pytest.raises(BonsaiValueError, match=r"found several: \['a.safetensors', 'b.safetensors'\]"):
        bl.read_lora(tmp_path, TC)
    (tmp_path / "b.safetensors").unlink()
    assert bl.read_lora(tmp_path, TC).source == str(tmp_path / "a.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(BonsaiValueError, match="junk.safetensors: not a readable safetensors file"):
        bl.read_lora(tmp_path / "junk.safetensors", TC)


def test_klein_4b_targets_cover_every_linear():
    targets = bl.lora_targets()
    assert len(targets) == 100 + 9
    assert targets["single_transformer_blocks.19.attn.to_qkv_mlp_proj"] == (3 * 3072 + 2 * 9216, 3072)
