"""Reference images, image-to-image start latents and their ids against diffusers' FLUX.2 [klein] pipelines.

The references are what diffusers itself computes: a tiny Flux2KleinPipeline / Flux2KleinInpaintPipeline is run and
the tensors it hands to the VAE encoder and to the transformer are recorded.
"""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai import images, latents as L, scheduler, testing
from bonsai.backends.torch import vae as tv
from bonsai.config import SchedulerConfig
from bonsai.errors import BonsaiValueError

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor  # noqa: E402

TC = testing.TINY_TRANSFORMER


def photo(w, h, mode="RGB", seed=0):
    """A smooth random image (resampling filters see real structure), in `mode`."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 8, 2), max(w // 8, 2), 4), dtype=np.uint8)
    img = Image.fromarray(small, "RGBA").resize((w, h), Image.Resampling.BILINEAR)
    return img.convert(mode) if mode != "RGBA" else img


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    transformer = diffusers.Flux2Transformer2DModel(
        patch_size=1, in_channels=TC.in_channels, num_layers=TC.num_layers, num_single_layers=TC.num_single_layers,
        attention_head_dim=TC.attention_head_dim, num_attention_heads=TC.num_attention_heads,
        joint_attention_dim=TC.joint_attention_dim, timestep_guidance_channels=TC.timestep_guidance_channels,
        mlp_ratio=TC.mlp_ratio, axes_dims_rope=TC.axes_dims_rope, rope_theta=TC.rope_theta, eps=TC.eps,
        guidance_embeds=False).eval()
    # No mid-block attention: its [HW, HW] scores at 1024x1024 inputs would dominate the run time (the encoder's
    # attention is checked in test_vae_encoder.py).
    cfg = dataclasses.replace(testing.TINY_VAE, mid_block_add_attention=False)
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, mid_block_add_attention=False,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    state = {k: v for k, v in testing.random_vae(cfg, seed=1).items() if ".attentions." not in k}
    vae.load_state_dict(state, strict=True)
    encoder = tv.load_vae_encoder(state, cfg)
    return transformer, vae, encoder


class _Stop(Exception):
    pass


def run_recorded(pipe, **kwargs):
    """Run a diffusers pipeline up to its first transformer call; return the VAE encode inputs and its kwargs."""
    encoded, calls = [], []
    encode = pipe.vae.encode

    def record_encode(x, *a, **k):
        encoded.append(x.clone())
        return encode(x, *a, **k)

    def record_call(_module, _args, kw):
        calls.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
        raise _Stop  # everything compared is in this call's inputs

    pipe.vae.encode = record_encode
    handle = pipe.transformer.register_forward_pre_hook(record_call, with_kwargs=True)
    try:
        embeds = torch.randn(1, 8, TC.joint_attention_dim, generator=torch.Generator().manual_seed(9))
        pipe(prompt_embeds=embeds, guidance_scale=1.0, output_type="latent",
             generator=torch.Generator("cpu").manual_seed(kwargs.pop("seed")), **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
        pipe.vae.encode = encode
    assert len(calls) == 1
    return encoded, calls[0]


def klein(parts, cls=None):
    transformer, vae, _ = parts
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in testing.SCHEDULER_CONFIG.items()
                                                         if not k.startswith("_")})
    return (cls or diffusers.Flux2KleinPipeline)(scheduler=sched, vae=vae, text_encoder=None, tokenizer=None,
                                                 transformer=transformer, is_distilled=True)


def inpaint(parts):
    return klein(parts, diffusers.Flux2KleinInpaintPipeline)


# --- reference images -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("refs", [
    [photo(100, 75)],  # floored to 96x64 by a centre crop
    [photo(1300, 900, seed=1), photo(64, 500, "P", seed=2)],  # area cap (LANCZOS), then crop; a palette image
    [photo(90, 130, "RGBA", seed=3), photo(77, 70, "L", seed=4), photo(128, 128, "CMYK", seed=5)],
])
def test_references_match_flux2_klein_pipeline(parts, refs):
    _, _, encoder = parts
    encoded, call = run_recorded(klein(parts), image=refs, num_inference_steps=1, seed=3)

    ours = images.reference_tensors(refs)
    assert len(encoded) == len(ours) == len(refs)
    for got, expected in zip(ours, encoded):
        assert got.dtype == torch.float32 and torch.equal(got, expected)  # same crop/resize/convert arithmetic

    # Transformer input: the noise of the output size (the first reference's), then every reference's tokens.
    h0, w0 = ours[0].shape[2] // 16, ours[0].shape[3] // 16
    x = L.pack(L.noise(3, 16 * h0, 16 * w0))
    grids = [(t.shape[2] // 16, t.shape[3] // 16) for t in ours]
    ref_tokens = torch.cat([encoder.encode_tokens(t) for t in ours], dim=1)
    hidden, ids = L.join_references(x, L.img_ids(h0, w0), ref_tokens, L.reference_ids(grids))
    expected = call["hidden_states"]
    assert hidden.shape == expected.shape == (1, h0 * w0 + sum(h * w for h, w in grids), 128)
    assert torch.equal(hidden[:, : h0 * w0], expected[:, : h0 * w0])
    assert ((hidden - expected).norm() / expected.norm()).item() <= 1e-4  # float32, the brief's bound
    assert torch.equal(ids, call["img_ids"][0])
    assert sorted(set(ids[h0 * w0:, 0].tolist())) == [10 * (i + 1) for i in range(len(refs))]


@pytest.mark.parametrize("image, match", [
    (np.zeros((64, 64, 3), np.uint8), "must be a PIL.Image.Image, got ndarray"),
    (Image.new("RGB", (0, 80)), "has size 0"),
    (Image.new("RGB", (63, 200)), "too small: 63x200"),
    (Image.new("RGB", (64, 520)), "aspect ratio is too extreme"),
])
def test_bad_references_raise_where_diffusers_does(image, match):
    with pytest.raises(ValueError):
        Flux2ImageProcessor.check_image_input(image)
    with pytest.raises(BonsaiValueError, match=f"^image (is )?{match}"):
        images.reference_tensors(image)


def test_bad_reference_lists_raise_before_any_work():
    with pytest.raises(BonsaiValueError, match=r"image: 5 reference images given; FLUX.2 \[klein\] takes at most 4"):
        images.reference_tensors([photo(64, 64)] * 5)
    with pytest.raises(BonsaiValueError, match="image is an empty list"):
        images.reference_tensors([])
    with pytest.raises(BonsaiValueError, match=r"^image\[1\] has mode 'La'"):
        images.reference_tensors([photo(64, 64), Image.new("La", (64, 64))])
    with pytest.raises(BonsaiValueError, match=r"^ref\[0\] is too small"):
        images.reference_tensors([Image.new("RGB", (8, 64))], name="ref")


def test_reference_ids_and_join_shapes():
    ids = L.reference_ids([(2, 3), (1, 2)])
    expected = torch.tensor([[10, r, c, 0] for r in range(2) for c in range(3)] + [[20, 0, c, 0] for c in range(2)])
    assert ids.dtype == torch.int64 and torch.equal(ids, expected)
    x = torch.zeros(2, 4, 8)
    hidden, all_ids = L.join_references(x, L.img_ids(2, 2), torch.ones(1, 8, 8), ids)
    assert hidden.shape == (2, 12, 8) and all_ids.shape == (12, 4)
    with pytest.raises(BonsaiValueError, match="do not fit"):
        L.join_references(x, L.img_ids(2, 2), torch.ones(1, 8, 6), ids)


# --- image-to-image ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 3, 4, 10, 28])
def test_start_step_matches_get_timesteps(parts, steps):
    pipe = inpaint(parts)
    mu = diffusers.pipelines.flux2.pipeline_flux2_klein.compute_empirical_mu(64, steps)
    ours = scheduler.sigmas(steps, 64, SchedulerConfig())
    for strength in [0.0, 0.05, 0.1, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.9, 0.99, 1.0]:
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        timesteps, remaining = pipe.get_timesteps(steps, strength, "cpu")
        if remaining < 1:
            with pytest.raises(BonsaiValueError, match="strength"):
                scheduler.start_step(steps, strength)
            continue
        start = scheduler.start_step(steps, strength)
        assert start == steps - remaining, strength
        assert np.allclose(np.array(ours[start:-1]) * 1000, timesteps.numpy(), rtol=1e-6, atol=0)
    assert scheduler.start_step(steps, 1.0) == 0


def test_noise_to_matches_scale_noise():
    sched = diffusers.FlowMatchEulerDiscreteScheduler(**{k: v for k, v in testing.SCHEDULER_CONFIG.items()
                                                         if not k.startswith("_")})
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x0, noise = torch.randn(1, 128, 3, 4, generator=g).to(dtype), torch.randn(1, 128, 3, 4, generator=g).to(dtype)
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / 8, 8), mu=0.7)
        for start in range(8):
            sched.set_begin_index(start)
            expected = sched.scale_noise(x0, sched.timesteps[start:start + 1], noise)
            sigma = float(sched.sigmas[start])
            assert torch.equal(scheduler.noise_to(x0, noise, sigma), expected), (dtype, start)
    assert torch.equal(scheduler.noise_to(x0, noise, 1.0), noise)  # strength 1.0: the text-to-image noise


@pytest.mark.parametrize("size, strength, steps", [((100, 75), 0.6, 4), ((1200, 1000), 0.3, 10), ((96, 64), 1.0, 3)])
def test_img2img_start_matches_flux2_klein_inpaint_pipeline(parts, size, strength, steps):
    """With an all-white mask the inpaint pipeline is image-to-image: compare its first transformer input."""
    _, _, encoder = parts
    init = photo(*size, seed=7)
    encoded, call = run_recorded(inpaint(parts), image=init, mask_image=Image.new("L", init.size, 255),
                                 strength=strength, num_inference_steps=steps, seed=5)

    x = images.init_tensor(init)
    assert torch.equal(x, encoded[0])
    h, w = x.shape[2] // 16, x.shape[3] // 16
    sigmas = scheduler.sigmas(steps, h * w, SchedulerConfig())
    start = scheduler.start_step(steps, strength)
    assert call["timestep"].item() == pytest.approx(sigmas[start], rel=1e-6)
    x0 = encoder.encode_tokens(x)
    noise = L.pack(L.noise(5, 16 * h, 16 * w))
    ours = scheduler.noise_to(x0, noise, sigmas[start])
    expected = call["hidden_states"][:, : h * w]
    assert ((ours - expected).norm() / expected.norm()).item() <= 1e-4
    assert torch.equal(call["img_ids"][0, : h * w], L.img_ids(h, w))


def test_init_tensor_sizes_and_errors():
    assert images.init_tensor(photo(100, 75)).shape == (1, 3, 64, 96)
    assert images.init_tensor(photo(100, 75), width=64, height=48).shape == (1, 3, 48, 64)
    big = images.init_tensor(photo(2000, 1000))
    assert big.shape == (1, 3, 720, 1440)  # int(2000 * s) = 1448 -> 1440, int(1000 * s) = 724 -> 720
    assert big.min() >= -1 and big.max() <= 1
    with pytest.raises(BonsaiValueError, match="^init_image is too small: 20x40"):
        images.init_tensor(Image.new("RGB", (20, 40)))
    with pytest.raises(BonsaiValueError, match="give both width and height"):
        images.init_tensor(photo(64, 64), width=64)
    with pytest.raises(ValueError, match="multiple of 16"):
        images.init_tensor(photo(64, 64), width=60, height=64)


def test_strength_errors():
    for bad in (-0.1, 1.5, "0.5", True, None):
        with pytest.raises(BonsaiValueError, match="strength must be a number in"):
            scheduler.start_step(4, bad)
    with pytest.raises(BonsaiValueError, match="strength=0.0 leaves no step of 4"):
        scheduler.start_step(4, 0.0)
