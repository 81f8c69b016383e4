"""bonsai.latents against the diffusers Flux2KleinPipeline helpers and Flux2PosEmbed."""

import types

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bonsai import latents as L

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_flux2 import Flux2PosEmbed  # noqa: E402
from diffusers.pipelines.flux2.pipeline_flux2_klein import Flux2KleinPipeline as P  # noqa: E402

FAST = settings(max_examples=15, deadline=None)


def reference_prepare_latents(seed, height, width, dtype):
    fake = types.SimpleNamespace(vae_scale_factor=8, _prepare_latent_ids=P._prepare_latent_ids,
                                 _pack_latents=P._pack_latents)
    g = torch.Generator("cpu").manual_seed(seed)
    return P.prepare_latents(fake, 1, 32, height, width, dtype, torch.device("cpu"), g)


@pytest.mark.parametrize("seed,height,width,dtype", [(0, 64, 64, torch.bfloat16), (42, 48, 80, torch.float32),
                                                      (7, 72, 57, torch.bfloat16)])
def test_noise_matches_prepare_latents(seed, height, width, dtype):
    ref_latents, ref_ids = reference_prepare_latents(seed, height, width, dtype)
    z = L.noise(seed, height, width, dtype=dtype)
    assert z.shape == (1, 128, height // 16, width // 16) and z.dtype == dtype
    assert torch.equal(L.pack(z), ref_latents)
    assert torch.equal(L.img_ids(height // 16, width // 16), ref_ids[0])


def test_noise_seed_and_size_errors():
    assert not torch.equal(L.noise(0, 32, 32), L.noise(1, 32, 32))
    with pytest.raises(ValueError, match="width"):
        L.noise(0, 32, 8)


@FAST
@given(h=st.integers(1, 6), w=st.integers(1, 6), b=st.integers(1, 2), c=st.sampled_from([4, 8]))
def test_pack_unpack_patchify_match_diffusers(h, w, b, c):
    z = torch.randn(b, c, 2 * h, 2 * w)
    patched = L.patchify(z)
    assert torch.equal(patched, P._patchify_latents(z))
    assert torch.equal(L.unpatchify(patched), P._unpatchify_latents(patched))
    assert torch.equal(L.unpatchify(patched), z)
    packed = L.pack(patched)
    assert torch.equal(packed, P._pack_latents(patched))
    ids = L.img_ids(h, w).unsqueeze(0).expand(b, -1, -1)
    assert torch.equal(L.unpack(packed, h, w), P._unpack_latents_with_ids(packed, ids, h, w))


def test_patchify_channel_order():
    z = torch.arange(16.0).reshape(1, 1, 4, 4)
    # channel c*4 + dy*2 + dx of token (i, j) is pixel (2i + dy, 2j + dx)
    patched = L.patchify(z)
    assert patched[0, :, 1, 0].tolist() == [8.0, 9.0, 12.0, 13.0]


@FAST
@given(n=st.integers(1, 40))
def test_txt_ids_match_diffusers(n):
    assert torch.equal(L.txt_ids(n), P._prepare_text_ids(torch.zeros(1, n, 3))[0])


@pytest.mark.parametrize("axes,theta", [((32, 32, 32, 32), 2000), ((4, 4, 4, 4), 2000), ((8, 16, 8, 4), 10000)])
def test_rope_tables_match_flux2_pos_embed(axes, theta):
    ids = torch.cat([L.txt_ids(7), L.img_ids(5, 6)])
    ids[3, 0] = 10  # a non-zero time coordinate (reference-image style) exercises axis 0
    ref_cos, ref_sin = Flux2PosEmbed(theta=theta, axes_dim=list(axes))(ids)
    cos, sin = L.rope_tables(ids, axes, theta)
    assert cos.dtype == torch.float32 and cos.shape == (ids.shape[0], sum(axes))
    torch.testing.assert_close(cos, ref_cos, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, ref_sin, rtol=0, atol=1e-7)
    np_cos, np_sin = L.rope_tables(ids.numpy(), axes, theta)
    assert isinstance(np_cos, np.ndarray)
    np.testing.assert_array_equal(np_cos, cos.numpy())
    np.testing.assert_array_equal(np_sin, sin.numpy())


def test_bn_denormalize_matches_pipeline_arithmetic():
    bn = torch.nn.BatchNorm2d(128, eps=1e-4, affine=False)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.1, 3)
    x = torch.randn(2, 128, 3, 4)
    # the decode step of Flux2KleinPipeline.__call__, written out
    expected = x * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + 1e-4) + bn.running_mean.view(1, -1, 1, 1)
    assert torch.equal(L.bn_denormalize(x, bn.running_mean, bn.running_var, 1e-4), expected)
    # inverse of the encode-side normalisation (eval-mode BatchNorm)
    torch.testing.assert_close(L.bn_denormalize(bn.eval()(x), bn.running_mean, bn.running_var, 1e-4), x)
    with pytest.raises(ValueError, match="running_mean"):
        L.bn_denormalize(torch.zeros(1, 64, 2, 2), bn.running_mean, bn.running_var, 1e-4)
