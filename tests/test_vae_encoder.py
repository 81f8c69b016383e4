"""VAE encoders (torch, MLX) against diffusers' AutoencoderKLFlux2.encode and the klein pipeline's encode glue."""

import importlib.util

import pytest
import torch

from bonsai import latents as L
from bonsai import testing
from bonsai.backends.torch import vae as tv
from bonsai.config import VAEConfig
from bonsai.errors import BonsaiValueError

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P  # noqa: E402

needs_mlx = pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx is not installed")
CFG = testing.TINY_VAE


def reference_vae(cfg: VAEConfig = CFG, seed: int = 0):
    ref = diffusers.AutoencoderKLFlux2(
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.block_out_channels)).eval()
    state = testing.random_vae(cfg, seed)
    ref.load_state_dict(state, strict=True)
    return ref, state


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / b.norm()).item()


def klein_tokens(ref, image):
    """Flux2KleinPipeline._encode_vae_image + _pack_latents, the pipeline's own static methods and arithmetic."""
    with torch.no_grad():
        z = diffusers.pipelines.flux2.pipeline_flux2_klein.retrieve_latents(ref.encode(image), sample_mode="argmax")
    z = P._patchify_latents(z)
    mean = ref.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps)
    return P._pack_latents((z - mean) / std)


def test_encoder_keys_are_the_diffusers_encode_path():
    ref, _ = reference_vae()
    with torch.device("meta"):
        ours = tv.VAEEncoder(CFG)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()
              if k.startswith(("encoder.", "quant_conv.")) or k in ("bn.running_mean", "bn.running_var")}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (2, 3, 48, 32)])
def test_torch_encode_matches_autoencoder_encode(shape):
    ref, state = reference_vae()
    model = tv.load_vae_encoder(state, CFG)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        moments = model(x)
    assert moments.shape == (shape[0], 64, shape[2] // 8, shape[3] // 8)
    assert rel_err(moments[:, :32], dist.mean) <= 1e-4
    assert rel_err(moments[:, 32:], dist.logvar) <= 1e-4
    assert rel_err(L.posterior_mode(moments), dist.mode()) <= 1e-4


def test_torch_tokens_match_the_klein_pipeline():
    ref, state = reference_vae(seed=3)
    model = tv.load_vae_encoder(state, CFG)
    x = torch.rand(1, 3, 64, 80, generator=torch.Generator().manual_seed(2)) * 2 - 1
    expected = klein_tokens(ref, x)
    out = model.encode_tokens(x)
    assert out.shape == expected.shape == (1, 4 * 5, 128)
    assert rel_err(out, expected) <= 1e-4


def test_bn_normalize_inverts_bn_denormalize():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 128, 3, 5, generator=g, dtype=torch.float64)
    mean = torch.randn(128, generator=g, dtype=torch.float64)
    var = torch.rand(128, generator=g, dtype=torch.float64) + 0.5
    expected = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-4)
    assert torch.allclose(L.bn_normalize(x, mean, var, 1e-4), expected, rtol=1e-12, atol=0)
    assert torch.allclose(L.bn_denormalize(L.bn_normalize(x, mean, var, 1e-4), mean, var, 1e-4), x, atol=1e-12)


def test_strict_loading_names_the_keys():
    _, state = reference_vae()
    bad = dict(state)
    bad.pop("encoder.conv_in.bias")
    bad["quant_conv.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(BonsaiValueError, match=r"vae/x: VAE encoder state dict does not match: missing "
                                               r"\['encoder.conv_in.bias'\]; wrong shapes \['quant_conv.weight"):
        tv.load_vae_encoder(bad, CFG, source="vae/x")


def test_bad_image_shape_raises():
    _, state = reference_vae()
    model = tv.load_vae_encoder(state, CFG)
    with pytest.raises(BonsaiValueError, match="multiples of 16"):
        model.encode_tokens(torch.zeros(1, 3, 40, 32))


def test_no_quant_conv_config():
    cfg = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, use_quant_conv=False)
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLFlux2(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                                       down_block_types=("DownEncoderBlock2D",) * 2,
                                       up_block_types=("UpDecoderBlock2D",) * 2, use_quant_conv=False).eval()
    model = tv.load_vae_encoder(ref.state_dict(), cfg)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert rel_err(model(x)[:, :32], ref.encode(x).latent_dist.mean) <= 1e-4


@needs_mlx
@pytest.mark.parametrize("shape", [(1, 3, 64, 96), (2, 3, 48, 32)])
def test_mlx_encode_matches_autoencoder_encode(shape):
    import mlx.core as mx
    import numpy as np

    from bonsai.backends.mlx import vae as mv

    ref, state = reference_vae(seed=5)
    model = mv.load_vae_encoder(state, CFG, dtype="float32")
    x = torch.rand(shape, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
    moments = np.array(model(mx.array(x.permute(0, 2, 3, 1).numpy()))).transpose(0, 3, 1, 2)
    assert rel_err(moments[:, :32], dist.mean) <= 1e-4
    assert rel_err(moments[:, 32:], dist.logvar) <= 1e-4
    tokens = model.encode_tokens(x)
    assert isinstance(tokens, mx.array)
    assert rel_err(np.array(tokens), klein_tokens(ref, x)) <= 1e-4


@needs_mlx
def test_mlx_strict_loading_names_the_keys():
    from bonsai.backends.mlx import vae as mv

    _, state = reference_vae()
    bad = {k: v for k, v in state.items() if k != "quant_conv.bias"}
    bad["encoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(BonsaiValueError, match=r"missing \['quant_conv.bias'\]; unexpected \['encoder.extra.weight'\]"):
        mv.load_vae_encoder(bad, CFG)
