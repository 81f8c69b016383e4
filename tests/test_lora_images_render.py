"""Whole renders with LoRA, reference images and image-to-image, against diffusers' Flux2KleinPipeline on the same
weights (torch backend, float32), and MLX against torch."""

import importlib.util

import numpy as np
import pytest
import torch
from PIL import Image

import bonsai
from bonsai import testing

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from test_pipeline import _diffusers_pipeline  # noqa: E402

PROMPT = "a red fox in snow"
LAYOUTS = [("gemlite", "ternary"), ("mlx", "binary"), ("unpacked", "ternary"), ("compact", "binary")]


def pixels(result_or_image) -> np.ndarray:
    img = result_or_image.image if hasattr(result_or_image, "image") else result_or_image
    return np.asarray(img).astype(np.int16)


def diffusers_pixels(ref, **kwargs) -> np.ndarray:
    out = ref(prompt=PROMPT, num_inference_steps=4, guidance_scale=1.0, output_type="np",
              generator=torch.Generator("cpu").manual_seed(3), text_encoder_out_layers=testing.TINY_FEATURE_LAYERS,
              **kwargs)
    return np.round(out.images[0] * 255).astype(np.int16)  # diffusers' numpy_to_pil rounding


def write_peft_lora(folder, transformer, seed=0):
    """A rank-4 LoRA on every linear of `transformer`, random A and B (small), saved as diffusers saves it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from bonsai.lora import lora_targets

    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(lora_targets(testing.TINY_TRANSFORMER)),
                        init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name="test")
    state = {k: 0.3 * v for k, v in get_peft_model_state_dict(transformer, adapter_name="test").items()}
    diffusers.Flux2KleinPipeline.save_lora_weights(folder, transformer_lora_layers=state,
                                                   transformer_lora_adapter_metadata=config.to_dict())
    transformer.delete_adapters("test")
    return folder


@pytest.mark.parametrize("layout, kind", LAYOUTS)
def test_lora_render_matches_diffusers(tmp_path, layout, kind):
    repo = testing.write_repo(tmp_path / "repo", layout=layout, kind=kind, seed=4)
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    ref = _diffusers_pipeline(repo)
    lora_dir = write_peft_lora(tmp_path / "lora", ref.transformer)
    plain = pixels(pipe(PROMPT, width=96, height=64, seed=3, progress=False))
    ref.load_lora_weights(lora_dir, adapter_name="test")
    name = pipe.load_lora(lora_dir, scale=1.0)
    assert pipe.loras == {name: 1.0}
    for scale in (1.0, 0.5):
        ref.set_adapters(["test"], adapter_weights=[scale])
        pipe.set_lora_scale(name, scale)
        ours = pixels(pipe(PROMPT, width=96, height=64, seed=3, progress=False))
        want = diffusers_pixels(ref, height=64, width=96)
        assert np.abs(ours - want).max() <= 2, (scale, np.abs(ours - want).max())
        assert np.abs(ours - plain).max() > 10  # the LoRA changes the image: the comparison can fail
    pipe.unload_lora()
    assert pipe.loras == {}
    assert np.array_equal(pixels(pipe(PROMPT, width=96, height=64, seed=3, progress=False)), plain)


def test_lora_errors_leave_the_model_unchanged(tmp_path):
    repo = testing.write_repo(tmp_path / "repo", seed=4)
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    plain = pixels(pipe(PROMPT, width=64, height=64, seed=1, progress=False))
    from safetensors.torch import save_file

    bad = tmp_path / "bad.safetensors"
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.randn(4, 7),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.randn(128, 4)}, bad)
    with pytest.raises(bonsai.BonsaiValueError, match="bad.safetensors"):
        pipe.load_lora(bad)
    with pytest.raises(bonsai.BonsaiValueError, match="no LoRA named"):
        pipe.set_lora_scale("nope", 1.0)
    with pytest.raises(bonsai.BonsaiValueError, match="scale"):
        pipe.load_lora(bad, scale=float("nan"))
    assert pipe.loras == {}
    assert np.array_equal(pixels(pipe(PROMPT, width=64, height=64, seed=1, progress=False)), plain)


def reference_images():
    g = np.random.default_rng(0)
    a = Image.fromarray(g.integers(0, 256, (80, 112, 3), dtype=np.uint8))  # cropped to 80x112 -> 80x112
    b = Image.fromarray(g.integers(0, 256, (70, 90, 3), dtype=np.uint8))  # centre-cropped to 64x80
    return [a, b]


@pytest.mark.parametrize("layout, kind", LAYOUTS[:2])
def test_edit_render_matches_diffusers(tmp_path, layout, kind):
    repo = testing.write_repo(tmp_path / "repo", layout=layout, kind=kind, seed=4)
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    ref = _diffusers_pipeline(repo)
    images = reference_images()
    ours = pipe(PROMPT, image=images, seed=3, progress=False)
    assert ours.image.size == (112, 80)  # the first reference's size, as diffusers renders without a size
    want = diffusers_pixels(ref, image=images)
    assert np.abs(pixels(ours) - want).max() <= 2
    plain = pixels(pipe(PROMPT, width=112, height=80, seed=3, progress=False))
    assert np.abs(pixels(ours) - plain).max() > 4  # the references change the image beyond the tolerance
    sized = diffusers_pixels(ref, image=images[1], height=48, width=64)
    assert np.abs(pixels(pipe(PROMPT, image=images[1], width=64, height=48, seed=3, progress=False)) - sized).max() <= 2


def test_img2img_strength_one_is_text_to_image_and_lower_strength_follows_the_image(tmp_path):
    repo = testing.write_repo(tmp_path / "repo", seed=4)
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    t2i = pixels(pipe(PROMPT, width=96, height=64, seed=3, progress=False))
    full = pipe(PROMPT, init_image=init, strength=1.0, seed=3, progress=False)
    assert full.image.size == (96, 64) and np.array_equal(pixels(full), t2i)
    steps = []
    low = pipe(PROMPT, init_image=init, strength=0.5, seed=3, progress=False, callback=lambda i, x: steps.append(i))
    assert steps == [2, 3]  # int(4 - 4 * 0.5) = 2: the last two of the four steps
    assert np.abs(pixels(low) - t2i).max() > 10
    assert bonsai.metadata(low.image)["strength"] == 0.5
    with pytest.raises(bonsai.BonsaiValueError, match="strength"):
        pipe(PROMPT, strength=0.5, progress=False)  # no init image
    with pytest.raises(bonsai.BonsaiValueError, match="strength"):
        pipe(PROMPT, init_image=init, strength=1.5, progress=False)
    with pytest.raises(bonsai.BonsaiValueError, match="init_image"):
        pipe(PROMPT, init_image="not an image", progress=False)


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="needs mlx")
def test_mlx_equals_torch_for_lora_edit_and_img2img(tmp_path):
    repo = testing.write_repo(tmp_path / "repo", layout="mlx", kind="ternary", seed=4)
    ours = bonsai.Pipeline.from_pretrained(repo, backend="torch", dtype=torch.float32)
    mlx = bonsai.Pipeline.from_pretrained(repo, backend="mlx", dtype="float32")
    ref = _diffusers_pipeline(repo)
    lora_dir = write_peft_lora(tmp_path / "lora", ref.transformer)
    init = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 96, 3), dtype=np.uint8))
    for pipe in (ours, mlx):
        pipe.load_lora(lora_dir, scale=0.7)
    cases = [dict(width=96, height=64), dict(image=reference_images()), dict(init_image=init, strength=0.75)]
    for kwargs in cases:
        a = pixels(ours(PROMPT, seed=5, progress=False, **kwargs))
        b = pixels(mlx(PROMPT, seed=5, progress=False, **kwargs))
        assert a.shape == b.shape and np.abs(a - b).max() <= 2, (kwargs.keys(), np.abs(a - b).max())
