"""Our VAE decoder against diffusers' AutoencoderKLFlux2.decode and the klein pipeline's decode glue."""

import numpy as np
import pytest
import torch

from bonsai import latents as L
from bonsai.backends.torch.vae import VAEDecoder, blend_tiles, load_vae_decoder
from bonsai.config import VAEConfig

diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P  # noqa: E402

# Two levels: conv_in, mid block (resnets + attention), an up block with upsampler, an up block whose first
# resnet changes width (conv_shortcut), conv_norm_out/conv_out. latent_channels 32 as in the real VAE.
TINY = VAEConfig(block_out_channels=(16, 32), up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                 latent_channels=32, norm_num_groups=8)


def reference_vae(cfg: VAEConfig = TINY, seed: int = 0):
    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLFlux2(
        block_out_channels=cfg.block_out_channels, down_block_types=("DownEncoderBlock2D",) * len(cfg.block_out_channels),
        up_block_types=cfg.up_block_types, layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
        mid_block_add_attention=cfg.mid_block_add_attention,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))  # norms and biases away from 1/0
        vae.bn.running_mean.uniform_(-0.5, 0.5)
        vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_keys_are_the_decoder_keys_of_diffusers():
    ref = reference_vae()
    with torch.device("meta"):
        ours = VAEDecoder(TINY)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()
              if not k.startswith(("encoder.", "quant_conv.")) and k != "bn.num_batches_tracked"}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == theirs


def test_decode_matches_autoencoder_decode():
    ref = reference_vae()
    model = load_vae_decoder(ref.state_dict(), TINY)
    z = torch.randn(2, 32, 6, 4)
    with torch.no_grad():
        expected = ref.decode(z).sample
        out = model.decode(z, tile=False)
    assert out.shape == expected.shape == (2, 3, 12, 8)
    assert rel_err(out, expected) <= 1e-4


def test_decode_latents_matches_pipeline_decode_path():
    ref = reference_vae()
    model = load_vae_decoder(ref.state_dict(), TINY)
    # The glue maps pixels to tokens at 16 px/token (the real VAE); this 2-level VAE then outputs 4 px/token.
    height, width = 48, 32
    h, w = height // 16, width // 16
    packed = torch.randn(2, h * w, 128)
    with torch.no_grad():
        # Flux2KleinPipeline.__call__ decode branch, written out with its own helpers
        z = P._unpack_latents_with_ids(packed, L.img_ids(h, w).unsqueeze(0).expand(2, -1, -1), h, w)
        z = z * torch.sqrt(ref.bn.running_var.view(1, -1, 1, 1) + ref.config.batch_norm_eps) + \
            ref.bn.running_mean.view(1, -1, 1, 1)
        image = ref.decode(P._unpatchify_latents(z)).sample
    pil = VaeImageProcessor(vae_scale_factor=2).postprocess(image, output_type="pil")
    expected = np.stack([np.asarray(im) for im in pil])
    out = model.decode_latents(packed, height, width)
    assert out.dtype == np.uint8 and out.shape == expected.shape == (2, 2 * 2 * h, 2 * 2 * w, 3)
    diff = np.abs(out.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_decode_latents_rejects_wrong_shape():
    model = load_vae_decoder(reference_vae().state_dict(), TINY)
    with pytest.raises(ValueError, match=r"must be \[B, 6, 128\]"):
        model.decode_latents(torch.zeros(1, 5, 128), 48, 32)


def test_blend_tiles_reproduces_a_local_function_exactly():
    # Nearest upsampling is local, so any tiling must give back the untiled result.
    fn = lambda t: t.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1) * 2 - 1  # noqa: E731
    z = torch.randn(1, 3, 23, 17)
    for blend in ("linear", "cosine"):
        for tile, overlap in ((8, 3), (10, 0), (16, 8), (40, 4)):
            torch.testing.assert_close(blend_tiles(fn, z, tile, overlap, 4, blend), fn(z), rtol=0, atol=1e-6)


def test_tiled_decode_close_to_untiled():
    ref = reference_vae()
    model = load_vae_decoder(ref.state_dict(), TINY)
    # A latent periodic with a period dividing the tile stride: every tile then holds the same content, so only
    # the tile borders (zero padding inside GroupNorm/attention context) separate tiled from untiled decoding.
    g = torch.Generator().manual_seed(3)
    z = torch.randn(1, 32, 4, 4, generator=g).repeat(1, 1, 12, 12)  # [1, 32, 48, 48]
    with torch.no_grad():
        full = model.decode(z, tile=False)
        auto = model.decode(z)  # 48 latent px: below the auto threshold, so untiled
        tiled = model.decode(z, tile=True, tile_size=32, tile_overlap=16)
        coarse = model.decode(z, tile=True, tile_size=16, tile_overlap=8)
    assert torch.equal(auto, full)
    assert tiled.shape == full.shape
    assert 0 < rel_err(tiled, full) <= 0.05
    assert rel_err(tiled, full) < rel_err(coarse, full)  # more context per tile -> closer


def test_strict_loading_ignores_encoder_and_names_keys():
    state = reference_vae().state_dict()
    assert any(k.startswith("encoder.") for k in state)
    load_vae_decoder(state, TINY)  # encoder / quant_conv / num_batches_tracked are ignored
    missing = {k: v for k, v in state.items() if k != "decoder.mid_block.attentions.0.to_q.bias"}
    with pytest.raises(ValueError, match=r"missing \['decoder.mid_block.attentions.0.to_q.bias'\]"):
        load_vae_decoder(missing, TINY)
    extra = dict(state, **{"decoder.up_blocks.9.resnets.0.conv1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"unexpected \['decoder.up_blocks.9"):
        load_vae_decoder(extra, TINY)
    bad = dict(state, **{"post_quant_conv.weight": torch.zeros(32, 32, 3, 3)})
    with pytest.raises(ValueError, match=r"post_quant_conv.weight: expected \(32, 32, 1, 1\)"):
        load_vae_decoder(bad, TINY)
