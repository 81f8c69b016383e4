"""The CUDA backend's Triton elementwise kernels in bf16 on the GPU, at the model's real widths, against the torch
code they replace (the interpreter rounds bf16 differently, so these bounds are only checked here)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BF16 = torch.bfloat16


def assert_close_bf16(got, want, max_differing, ulps=1):
    """Within `ulps` bf16 ulps of the torch code everywhere (the mean magnitude floors the scale: near-zero
    outputs inherit their inputs' rounding), and equal to it at all but `max_differing` of the elements."""
    assert got.dtype == want.dtype == BF16 and got.shape == want.shape
    scale = torch.maximum(got.float().abs(), want.float().abs()).clamp_min(want.float().abs().mean())
    ratio = ((got.float() - want.float()).abs() / (torch.finfo(BF16).eps * scale)).max().item()
    differing = (got != want).float().mean().item()
    assert ratio <= ulps and differing <= max_differing, f"{ratio:.2f} ulp at most, {differing:.2e} differing"


@pytest.mark.parametrize("shape", [(1, 128, 256, 256), (2, 512, 64, 64), (1, 256, 33, 47)])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_silu_equals_the_torch_group_norm(shape, fmt, silu):
    from bonsai.backends.cuda.elementwise import group_norm_silu
    from bonsai.backends.torch.vae import GroupNorm, norm_act

    g = torch.Generator("cuda").manual_seed(0)
    c = shape[1]
    norm = GroupNorm(32, c, eps=1e-6).cuda()
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(c, generator=g, device="cuda"))
        norm.bias.copy_(0.3 * torch.randn(c, generator=g, device="cuda"))
    norm = norm.to(BF16)
    x = (torch.randn(shape, generator=g, device="cuda") * 4 + 2).to(BF16)
    with torch.inference_mode():
        got = group_norm_silu(x.contiguous(memory_format=fmt), 32, norm.weight, norm.bias, 1e-6, silu)
        want = norm_act(norm, x, silu)
    assert got.is_contiguous(memory_format=fmt)
    # With the SiLU, a norm output rounded the other way (the statistics are summed in another order) moves
    # the SiLU's output by up to two ulps.
    assert_close_bf16(got, want, 1e-3, ulps=2 if silu else 1)


@pytest.mark.parametrize("c_in, c_out, size", [(512, 512, 64), (256, 128, 96), (128, 3, 80)])
def test_conv_bias_folds_equal_the_torch_convs(c_in, c_out, size):
    """channels_last, as the VAE runs: the conv bias added inside the norm's passes, or with the residual in one
    pass, against torch's own cuDNN conv (whose bias add is a separate op); the 2x nearest upsampling."""
    from bonsai.backends.cuda.elementwise import conv_bias_add, conv_group_norm_silu, upsample_nearest
    from bonsai.backends.torch.vae import GroupNorm, conv_add, conv_norm_act, upsample

    g = torch.Generator("cuda").manual_seed(5)
    cl = torch.channels_last
    layer = torch.nn.Conv2d(c_in, c_out, 3, padding=1).cuda()
    with torch.no_grad():
        layer.bias.copy_(torch.randn(c_out, generator=g, device="cuda"))
    layer = layer.to(BF16, memory_format=cl)
    h = torch.randn(2, c_in, size, size, generator=g, device="cuda").to(BF16).contiguous(memory_format=cl)
    x = (3 * torch.randn(2, c_out, size, size, generator=g, device="cuda")).to(BF16).contiguous(memory_format=cl)
    with torch.inference_mode():
        got, want = conv_bias_add(layer, h, x), conv_add(layer, h, x)
        assert got.is_contiguous(memory_format=cl) and torch.equal(got, want)
        assert torch.equal(conv_bias_add(layer, h), layer(h))
        assert torch.equal(upsample_nearest(x), upsample(x))
        if c_out % 32 == 0:
            norm = GroupNorm(32, c_out, eps=1e-6).cuda().to(BF16)
            assert_close_bf16(conv_group_norm_silu(layer, norm, h, True), conv_norm_act(layer, norm, h, True), 1e-3,
                              ulps=2)


def test_rms_norm_rope_equals_norm_then_rope():
    """Real widths: 24 heads of 128, text and image parts from strided views of their projections."""
    from bonsai import latents
    from bonsai.backends.cuda.elementwise import rms_norm_rope
    from bonsai.backends.torch.transformer import Flux2Transformer, norm_rope
    from bonsai.config import KLEIN_4B

    g = torch.Generator("cuda").manual_seed(1)
    heads, d, n_txt, h, w = 24, 128, 512, 32, 32
    proj_t = torch.randn(2, n_txt, 3 * heads * d, generator=g, device="cuda").to(BF16)
    proj_i = torch.randn(2, h * w, 3 * heads * d + 2 * 9216, generator=g, device="cuda").to(BF16)
    xt = proj_t[..., heads * d:2 * heads * d].unflatten(-1, (heads, d))
    xi = proj_i[..., heads * d:2 * heads * d].unflatten(-1, (heads, d))
    wt, wi = ((1 + 0.1 * torch.randn(d, generator=g, device="cuda")).to(BF16) for _ in range(2))
    with torch.device("meta"):
        model = Flux2Transformer(KLEIN_4B)
    freqs = model.rope(latents.img_ids(h, w), latents.txt_ids(n_txt), "cuda")
    with torch.inference_mode():
        for parts, fr in ((((xt, wt), (xi, wi)), freqs), (((xi, wi),), freqs[n_txt:])):
            # a normed value rounded the other way moves its rotated pair by up to two ulps
            assert_close_bf16(rms_norm_rope(parts, 1e-6, fr), norm_rope(parts, 1e-6, fr), 1e-3, ulps=2)


def test_join_swiglu_equals_cat_of_swiglu():
    from bonsai.backends.cuda.elementwise import join_swiglu
    from bonsai.backends.torch.transformer import join_swiglu as join_swiglu_ref

    g = torch.Generator("cuda").manual_seed(2)
    proj = torch.randn(2, 1536, 3 * 3072 + 2 * 9216, generator=g, device="cuda").to(BF16)
    attn = torch.randn(2, 1536, 3072, generator=g, device="cuda").to(BF16)
    with torch.inference_mode():
        got, want = join_swiglu(attn, proj[..., 3 * 3072:]), join_swiglu_ref(attn, proj[..., 3 * 3072:])
    assert torch.equal(got[..., :3072], attn)
    assert_close_bf16(got, want, 1e-3)


def test_swiglu_and_gated_add_equal_the_torch_ops():
    """The double block's feed-forward SwiGLU and the gated residuals, at the real widths."""
    from bonsai.backends.cuda.elementwise import gated_add, swiglu
    from bonsai.backends.torch.transformer import gated_add as gated_add_ref, swiglu as swiglu_ref

    g = torch.Generator("cuda").manual_seed(4)
    mlp = torch.randn(1, 4096, 2 * 9216, generator=g, device="cuda").to(BF16)
    x = (4 * torch.randn(2, 4608, 3072, generator=g, device="cuda")).to(BF16)
    y = torch.randn(2, 4608, 3072, generator=g, device="cuda").to(BF16)
    _, gate = torch.randn(2, 1, 2 * 3072, generator=g, device="cuda").to(BF16).chunk(2, dim=-1)
    with torch.inference_mode():
        assert_close_bf16(swiglu(mlp), swiglu_ref(mlp), 1e-3)
        # one rounding of the same float arithmetic as addcmul (an FMA may round a tie the other way)
        assert_close_bf16(gated_add(x, gate, y), gated_add_ref(x, gate, y), 1e-4)
        h = (2e4 * torch.randn(1, 512, 3072, generator=g, device="cuda")).clamp(-6e4, 6e4).half()
        gate = 3 * gate[:1].half()  # h + gate * h overflows fp16 somewhere
        got, want = gated_add(h, gate, h, clip=True), gated_add_ref(h, gate, h, clip=True)
    assert got.abs().max().item() == 65504 and torch.equal(got, want)


def test_modulate_equals_layer_norm_then_affine():
    from bonsai.backends.cuda.elementwise import modulate
    from bonsai.backends.torch.transformer import modulate as modulate_ref

    g = torch.Generator("cuda").manual_seed(3)
    x = (torch.randn(2, 4608, 3072, generator=g, device="cuda") * 3 + 1).to(BF16)
    _, shift, scale = (0.5 * torch.randn(2, 1, 3 * 3072, generator=g, device="cuda")).to(BF16).chunk(3, dim=-1)
    with torch.inference_mode():
        got, want = modulate(x, shift, scale, 1e-6), modulate_ref(x, shift, scale, 1e-6)
    # a LayerNorm output rounded the other way moves the product by up to two ulps
    assert_close_bf16(got, want, 1e-3, ulps=2)


def test_text_encoder_kernels_equal_the_torch_ops():
    """Qwen3-4B's widths over 512 tokens: the RMSNorms (2560), the QK norm + RoPE of 8 kv heads of 128 repeated 4
    times (a strided view of a fused projection) and of the 32 query heads, the SiLU-gated product (9728)."""
    from bonsai.backends.cuda import elementwise as ew
    from bonsai.backends.torch import text_encoder as te
    from bonsai.config import Qwen3Fields

    g = torch.Generator("cuda").manual_seed(5)
    norm, qk = te.RMSNorm(2560, 1e-6).cuda(), te.RMSNorm(128, 1e-6).cuda()
    with torch.no_grad():
        for n in (norm, qk):
            n.weight.copy_(1 + 0.2 * torch.randn(n.weight.shape, generator=g, device="cuda"))
    norm, qk = norm.to(BF16), qk.to(BF16)
    x, y = ((3 * torch.randn(2, 512, 2560, generator=g, device="cuda")).to(BF16) for _ in range(2))
    proj = torch.randn(2, 512, 4096 + 2 * 1024, generator=g, device="cuda").to(BF16)
    xq, xk = proj[..., :4096].unflatten(-1, (32, 128)), proj[..., 4096:5120].unflatten(-1, (8, 128))
    config = Qwen3Fields(vocab_size=8, hidden_size=2560, intermediate_size=9728, num_hidden_layers=1,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6)
    freqs = torch.arange(512, device="cuda", dtype=torch.float32)[:, None] * te.rope_inv_freq(config).cuda()
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(BF16), emb.sin().to(BF16)
    gate, up = ((2 * torch.randn(2, 512, 9728, generator=g, device="cuda")).to(BF16) for _ in range(2))
    with torch.inference_mode():
        # a normed value rounded the other way moves its product with the weight by up to two ulps
        assert_close_bf16(ew.rms_norm(norm, x), te.rms_norm(norm, x), 1e-3, ulps=2)
        (total, got), (total_ref, want) = ew.add_rms_norm(norm, x, y), te.add_rms_norm(norm, x, y)
        assert torch.equal(total, total_ref)
        assert_close_bf16(got, want, 1e-3, ulps=2)
        for xh, n_rep in ((xk, 4), (xq, 1)):
            got = ew.text_norm_rope(qk, xh, cos, sin, n_rep)
            assert got.shape == (2, xh.shape[2] * n_rep, 512, 128)
            assert_close_bf16(got, te.norm_rope(qk, xh, cos, sin, n_rep), 1e-3, ulps=2)
        assert_close_bf16(ew.silu_mul(gate, up), te.silu_mul(gate, up), 1e-3)


def test_text_encoder_with_triton_elementwise_is_as_close_to_float32_as_the_torch_ops():
    """Two real-width Qwen3-4B layers over a right-padded batch of 512 tokens with the kernels in place."""
    from bonsai.backends.cuda.runtime import TRITON_TEXT_OPS
    from bonsai.backends.torch import text_encoder as te
    from bonsai.config import Qwen3Fields
    from bonsai.testing import random_text_encoder

    config = Qwen3Fields(vocab_size=1000, hidden_size=2560, intermediate_size=9728, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6)
    state = random_text_encoder(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (2, 512), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, 20:], mask[1, 300:] = 0, 0
    feats = {}
    for name, dtype, ops in (("f32", torch.float32, te.TORCH_TEXT_OPS), ("torch", BF16, te.TORCH_TEXT_OPS),
                             ("triton", BF16, TRITON_TEXT_OPS)):
        model = te.load_text_encoder(config, state, device="cuda", dtype=dtype, layers=(1, 2), ops=ops)
        feats[name] = te.encode(model, ids, mask, (1, 2)).float()
        del model
    err = lambda name: ((feats[name] - feats["f32"]).norm() / feats["f32"].norm()).item()  # noqa: E731
    assert torch.isfinite(feats["triton"]).all()
    assert err("triton") <= 1.25 * err("torch") + 1e-3, (err("triton"), err("torch"))


@pytest.mark.parametrize("b, n, scratch_rows", [(1, 16384, None), (2, 4096, None), (1, 4096, 512), (1, 1000, 128)])
def test_vae_attention_as_gemms_is_as_close_to_float32_as_sdpa(monkeypatch, b, n, scratch_rows):
    """The VAE's head-dim-512 attention (16384 positions at 1024x1024: four chunks of 4096 queries; or shorter
    chunks) against float32 attention: its mean error within 1.1x bf16 SDPA's own, its largest under the issue's
    1e-2 relative. (The largest alone is one element's: on the H200 it ranged 1.07-1.7x SDPA's over these inputs
    while the mean errors stayed within 1.03x.)"""
    from bonsai.backends.cuda import elementwise

    if scratch_rows is not None:
        monkeypatch.setattr(elementwise, "ATTENTION_SCRATCH", 6 * n * scratch_rows)
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, 1, n, 512, generator=g, device="cuda").to(BF16) for _ in range(3))
    f32 = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    got = elementwise.attention(q, k, v)
    assert got.dtype == BF16 and got.shape == q.shape
    mean_err = lambda y: (y.float() - f32).abs().mean().item()  # noqa: E731
    assert mean_err(got) <= 1.1 * mean_err(sdpa), (mean_err(got), mean_err(sdpa))
    assert ((got.float() - f32).abs().max() / f32.abs().max()).item() <= 1e-2


def test_transformer_and_vae_with_triton_elementwise_equal_the_torch_ops():
    """The whole model (3 real-width blocks) and the VAE decoder with the kernels in place: as close to the
    float32 model as the bf16 torch ops are (bf16 noise over random weights is ~1% here)."""
    from bonsai.backends.cuda.runtime import TRITON_OPS, TRITON_VAE_OPS
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.backends.torch.vae import load_vae_decoder
    from bonsai.config import TransformerConfig, VAEConfig
    from bonsai.testing import random_vae
    from test_cuda_transformer import REAL_WIDTH_FEW_LAYERS, fast_linears, inputs, random_tensors, run

    cfg = TransformerConfig(**REAL_WIDTH_FEW_LAYERS)
    tensors = random_tensors(cfg, "ternary")
    args = inputs(cfg, h=16, w=16, n_txt=64)
    f32 = run(load_transformer(tensors, cfg, device="cuda", dtype=torch.float32), args, torch.float32)
    ref = run(load_transformer(tensors, cfg, device="cuda", dtype=BF16, make_linear=fast_linears("auto")), args, BF16)
    got = run(load_transformer(tensors, cfg, device="cuda", dtype=BF16, make_linear=fast_linears("auto"),
                               ops=TRITON_OPS), args, BF16)
    err = lambda y, want: ((y - want).norm() / want.norm()).item()  # noqa: E731
    assert torch.isfinite(got).all()
    assert err(got, f32) <= 1.25 * err(ref, f32) + 1e-3, (err(got, f32), err(ref, f32), err(got, ref))

    vcfg = VAEConfig()
    state = random_vae(vcfg)
    z = torch.randn(1, vcfg.latent_channels, 32, 32, device="cuda").to(BF16)
    with torch.inference_mode():
        f32 = load_vae_decoder(state, vcfg, device="cuda")(z.float())
        want = load_vae_decoder(state, vcfg, device="cuda", dtype=BF16)(z).float()
        vae = load_vae_decoder(state, vcfg, device="cuda", dtype=BF16, ops=TRITON_VAE_OPS)
        img = vae.to(memory_format=torch.channels_last)(z).float()
    assert err(img, f32) <= 1.25 * err(want, f32) + 1e-3, (err(img, f32), err(want, f32), err(img, want))


def test_pipeline_renders_the_same_image_with_either_elementwise_option(tmp_path):
    """The two bf16 renders within issue 13's fidelity envelope, diffusers' own bf16 vs fp32 on CUDA (max
    12-13/255, mean 1.1/255): besides the kernels' roundings (each checked to 1-2 ulps above), the decoders differ
    in layout (the torch ops keep it NCHW, so cuDNN runs other convolution kernels)."""
    import numpy as np

    from bonsai import testing
    from bonsai.errors import BonsaiValueError
    from bonsai.pipeline import Pipeline

    repo = testing.write_repo(tmp_path / "ternary-gemlite", "gemlite", "ternary")
    with pytest.raises(BonsaiValueError, match="elementwise must be 'triton' or 'torch', got 'fast'"):
        Pipeline.from_pretrained(repo, backend="cuda", elementwise="fast")
    images = [np.asarray(Pipeline.from_pretrained(repo, backend="cuda", elementwise=e)(
        "a bonsai", width=128, height=128, seed=3, progress=False).images[0], dtype=np.int16) for e in ("triton", "torch")]
    diff = np.abs(images[0] - images[1])
    assert diff.max() <= 13 and diff.mean() < 1.0, (diff.max(), diff.mean())
