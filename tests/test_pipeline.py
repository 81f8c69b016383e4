"""The whole pipeline on tiny synthetic repos, against diffusers' Flux2KleinPipeline on identical weights."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import bonsai
from bonsai import testing, weights
from bonsai.quant import LowBitWeight

@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return testing.write_repo(tmp_path_factory.mktemp("repo") / "tiny-ternary-gemlite", layout="gemlite", seed=0)


@pytest.fixture(scope="module")
def pipe(repo):
    return bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)


def _diffusers_pipeline(repo):
    diffusers = pytest.importorskip("diffusers")
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tw = weights.read_transformer(repo)
    dense = {k: v.dequantize(torch.float32) if isinstance(v, LowBitWeight) else v.float() for k, v in tw.tensors.items()}
    transformer = diffusers.Flux2Transformer2DModel(**{k: getattr(tw.config, k) for k in (
        "patch_size", "in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
        "joint_attention_dim", "timestep_guidance_channels", "mlp_ratio", "axes_dims_rope", "rope_theta", "eps",
        "guidance_embeds")})
    transformer.load_state_dict(dense, strict=True)
    te_config, te_state = weights.read_text_encoder(repo)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(**te_config.to_dict()))  # bonsai's config is not transformers'
    missing, unexpected = text_encoder.load_state_dict({k: v.float() for k, v in te_state.items()}, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing), (missing, unexpected)
    vae = diffusers.AutoencoderKLFlux2.from_pretrained(repo / "vae", torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(weights.tokenizer_dir(repo))
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(repo / "scheduler")
    return diffusers.Flux2KleinPipeline(scheduler=sched, vae=vae, text_encoder=text_encoder.float(),
                                        tokenizer=tokenizer, transformer=transformer.float(), is_distilled=True)


@pytest.mark.parametrize("layout, kind", [("gemlite", "ternary"), ("mlx", "binary"), ("unpacked", "ternary"),
                                          ("compact", "binary"), ("gemlite", "binary")])
def test_pipeline_matches_diffusers(tmp_path, layout, kind):
    repo = testing.write_repo(tmp_path / f"{kind}-{layout}", layout=layout, kind=kind, seed=4)
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    ref = _diffusers_pipeline(repo)
    seen = {}

    def grab(_pipe, i, t, kw):
        seen["latents"] = kw["latents"].clone()
        return kw

    out = ref(prompt="a red fox in snow", height=64, width=96, num_inference_steps=4, guidance_scale=1.0,
              generator=torch.Generator("cpu").manual_seed(3), output_type="np", text_encoder_out_layers=testing.TINY_FEATURE_LAYERS,
              callback_on_step_end=grab)
    ours = {}
    result = pipe("a red fox in snow", width=96, height=64, seed=3, progress=False,
                  callback=lambda i, x: ours.__setitem__("latents", x.clone()))
    a, b = ours["latents"].float(), seen["latents"].float()
    assert a.shape == b.shape
    assert (a - b).norm() / b.norm() <= 1e-3
    ref_pixels = np.round(out.images[0] * 255).astype(np.int16)  # diffusers' numpy_to_pil rounding
    ours_pixels = np.asarray(result.image).astype(np.int16)
    assert ours_pixels.shape == ref_pixels.shape == (64, 96, 3)
    assert np.abs(ours_pixels - ref_pixels).max() <= 2


def test_same_seed_same_image_and_metadata(pipe, tmp_path):
    a = pipe("a lighthouse", width=64, height=64, seed=11, style="sketch", progress=False)
    b = pipe("a lighthouse", width=64, height=64, seed=11, style="sketch", progress=False)
    c = pipe("a lighthouse", width=64, height=64, seed=12, style="sketch", progress=False)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))
    path = tmp_path / "x.png"
    a.save(path)
    meta = bonsai.pipeline.metadata(Image.open(path))
    assert meta == dict(prompt="a lighthouse", style="sketch", seed=11, width=64, height=64, steps=4)
    about = bonsai.pipeline.about(Image.open(path))
    assert about["backend"] == "torch" and about["variant"] == "ternary-gemlite" and about["bonsai"]
    again = pipe(**meta, progress=False)
    assert np.array_equal(np.asarray(again.image), np.asarray(Image.open(path).convert("RGB")))
    r = a.report
    assert r.encode_s > 0 and r.denoise_s > 0 and r.decode_s > 0 and r.total_s >= r.denoise_s


def test_batch_of_prompts_uses_consecutive_seeds(pipe):
    both = pipe(["a cat", "a dog"], width=64, height=48, seed=5, progress=False)
    single = pipe("a dog", width=64, height=48, seed=6, progress=False)
    assert [json.loads(im.info["bonsai"])["seed"] for im in both.images] == [5, 6]
    assert np.array_equal(np.asarray(both.images[1]), np.asarray(single.image))


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="", width=64, height=64), "prompt"),
    (dict(prompt=["ok", " "], width=64, height=64), "prompt"),
    (dict(prompt="x", width=100, height=64), "multiple of 16"),
    (dict(prompt="x", width=64, height=64, steps=0), "steps"),
    (dict(prompt="x", width=64, height=64, steps=2.5), "steps"),
    (dict(prompt="x", width=64, height=64, seed=-1), "seed"),
    (dict(prompt="x", width=64, height=64, style="baroque"), "style"),
    (dict(prompt="x", width=64, aspect="16:9"), "either"),
])
def test_bad_arguments_raise_clear_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs, progress=False)


def test_missing_files_raise_clear_errors(tmp_path, repo):
    with pytest.raises(FileNotFoundError):
        bonsai.Pipeline.from_pretrained(tmp_path / "nope" / "deeper", backend="torch")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises((FileNotFoundError, ValueError), match="transformer"):
        bonsai.Pipeline.from_pretrained(empty, backend="torch")


def test_pipeline_shared_between_threads(pipe):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        a, b = ex.map(lambda s: pipe("a tree", width=32, height=32, seed=s, progress=False), [1, 1])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_warmup_renders_each_size(pipe):
    seconds = pipe.warmup([(64, 32), (32, 48)])
    assert set(seconds) == {(64, 32), (32, 48)} and all(v > 0 for v in seconds.values())
    with pytest.raises(ValueError, match="multiple of 16"):
        pipe.warmup([(50, 32)])


def test_rope_tables_are_computed_once_per_position_ids(pipe):
    """A render reuses the RoPE table of its size (and references); new ids get their own, equal to a fresh one."""
    from bonsai import latents

    rt, txt = pipe.runtime, latents.txt_ids(pipe.text_config.max_length)
    feats = [torch.zeros(1, txt.shape[0], pipe.transformer_config.joint_attention_dim)]
    first = rt.condition(feats, latents.img_ids(2, 3), txt).rope
    assert rt.condition(feats, latents.img_ids(2, 3), txt).rope is first
    other = rt.condition(feats, latents.img_ids(3, 2), txt).rope  # same count of tokens, other positions
    assert other is not first and not torch.equal(other, first)
    assert torch.equal(other, rt.transformer.rope(latents.img_ids(3, 2), txt, rt.device))
    ref_ids = latents.reference_ids([(2, 2)])
    with_ref = rt.condition(feats, latents.img_ids(2, 3), txt, (torch.zeros(1, 4, 128), ref_ids)).rope
    assert with_ref.shape[0] == first.shape[0] + 4 and torch.equal(with_ref[:first.shape[0]], first)
    for h in range(4, 9):  # the cache is bounded: the oldest tables go
        rt.condition(feats, latents.img_ids(h, 1), txt)
    assert rt.condition(feats, latents.img_ids(2, 3), txt).rope is not first
