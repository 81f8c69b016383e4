"""MLX VAE decoder vs diffusers' AutoencoderKLFlux2 (+ the klein pipeline's latent glue) on a tiny config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

mx = pytest.importorskip("mlx.core")
pytest.importorskip("diffusers")

from bonsai.backends.mlx import vae as mv  # noqa: E402
from bonsai.config import VAEConfig  # noqa: E402

TINY = dict(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8, latent_channels=32)


def make_vae(seed=0):
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    ref = AutoencoderKLFlux2(**TINY, sample_size=32).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))  # break the zero/one inits so every weight matters
        ref.bn.running_mean.copy_(0.3 * torch.randn(128))
        ref.bn.running_var.copy_(0.5 + torch.rand(128))
    return ref


def reference_images(ref, packed: torch.Tensor, height: int, width: int) -> np.ndarray:
    """The Flux2KleinPipeline decode path: unpack, BN de-normalise, unpatchify, vae.decode, postprocess."""
    from diffusers import Flux2KleinPipeline as P

    h, w = height // 16, width // 16
    ids = P._prepare_latent_ids(torch.zeros(packed.shape[0], 128, h, w))
    z = P._unpack_latents_with_ids(packed, ids, h, w)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    z = P._unpatchify_latents(z * std + ref.bn.running_mean.view(1, -1, 1, 1))
    with torch.no_grad():
        img = ref.decode(z, return_dict=False)[0]
    img = (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (img * 255).round().astype(np.uint8)


def test_decoder_matches_diffusers():
    ref = make_vae()
    model = mv.load_vae_decoder(ref.state_dict(), VAEConfig(**TINY), dtype="float32")
    z = torch.randn(1, 32, 8, 10)
    with torch.no_grad():
        want = ref.decode(z, return_dict=False)[0].permute(0, 2, 3, 1).numpy()
    got = np.array(model.decode(mx.array(z.permute(0, 2, 3, 1).numpy())))
    assert got.shape == want.shape
    assert np.abs(got - want).max() / np.abs(want).max() <= 1e-4


def test_decode_latents_matches_pipeline_path():
    ref = make_vae()
    model = mv.load_vae_decoder(ref.state_dict(), VAEConfig(**TINY), dtype="float32")
    packed = torch.randn(2, 3 * 4, 128)  # 48 x 64 pixels
    want = reference_images(ref, packed, 48, 64)
    got = model.decode_latents(mx.array(packed.numpy()), 48, 64)
    assert got.dtype == np.uint8 and got.shape == (2, 48, 64, 3)
    assert np.abs(got.astype(int) - want).max() <= 1


@pytest.mark.parametrize("blend", ["cosine", "linear"])
def test_tiled_decode_matches_torch_reference(blend):
    from bonsai.backends.torch.vae import load_vae_decoder as load_torch

    ref = make_vae()
    torch_vae = load_torch(ref.state_dict(), VAEConfig(**TINY), dtype=torch.float32)
    model = mv.load_vae_decoder(ref.state_dict(), VAEConfig(**TINY), dtype="float32")
    packed = torch.randn(1, 5 * 4, 128)  # VAE latents 10 x 8 -> 3 x 2 tiles of 4 with overlap 1, flush edges
    want = torch_vae.decode_latents(packed, 80, 64, tile=True, tile_size=4, tile_overlap=1, blend=blend)
    got = model.decode_latents(mx.array(packed.numpy()), 80, 64, tile=True, tile_size=4, tile_overlap=1, blend=blend)
    assert got.shape == want.shape == (1, 80, 64, 3)
    assert np.abs(got.astype(int) - want).max() <= 1
    # tiles are a real approximation: they differ from the single-pass decode
    assert not np.array_equal(got, model.decode_latents(mx.array(packed.numpy()), 80, 64, tile=False))


def test_blend_tiles_reproduces_a_local_function():
    z = mx.random.normal((1, 11, 9, 2))
    fn = lambda t: mx.repeat(mx.repeat(t * 2 + 1, 8, axis=1), 8, axis=2)  # noqa: E731  pointwise, upsampled
    got = mv.blend_tiles(fn, z, tile=4, overlap=1, scale=8)
    np.testing.assert_allclose(np.array(got), np.array(fn(z)), rtol=1e-6, atol=1e-6)


def test_auto_tiling_by_memory_budget():
    ref = make_vae()
    model = mv.load_vae_decoder(ref.state_dict(), VAEConfig(**TINY), dtype="float32")
    packed = mx.array(torch.randn(1, 8 * 8, 128).numpy())
    full = model.decode_latents(packed, 128, 128, tile=False)
    assert np.array_equal(model.decode_latents(packed, 128, 128, max_memory_gb=8), full)  # fits: one pass
    half = mv.decode_memory_bytes(16, 16, 1, "float32", VAEConfig(**TINY)) / 2 / 1e9
    assert mv.choose_tile(16, 16, 1, "float32", half, VAEConfig(**TINY)) == 8
    tiled = model.decode_latents(packed, 128, 128, max_memory_gb=half)
    assert tiled.shape == full.shape and not np.array_equal(tiled, full)


def test_choose_tile_by_memory():
    assert mv.choose_tile(16, 16, 1, "float16", max_memory_gb=8) is None  # fits: no tiling
    big = mv.choose_tile(256, 256, 1, "float16", max_memory_gb=2)
    assert big < 256 and mv.decode_memory_bytes(big, big, 1, "float16") <= 2e9
    assert mv.choose_tile(256, 256, 1, "float32", max_memory_gb=2) <= big


def test_load_rejects_missing_keys():
    ref = make_vae()
    state = {k: v for k, v in ref.state_dict().items() if k != "decoder.conv_out.weight"}
    with pytest.raises(ValueError, match=r"missing \[.decoder.conv_out.weight.\]"):
        mv.load_vae_decoder(state, VAEConfig(**TINY))
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("bn.running_var")}
    with pytest.raises(ValueError, match="bn.running_var"):
        mv.load_vae_decoder(state, VAEConfig(**TINY))
