"""Our torch transformer against diffusers' Flux2Transformer2DModel on identical random weights."""

import dataclasses
import types

import numpy as np
import pytest
import torch

from bonsai import latents
from bonsai.backends.torch.linear import LowBitLinear
from bonsai.backends.torch.transformer import Flux2Transformer, load_transformer
from bonsai.config import TransformerConfig

diffusers = pytest.importorskip("diffusers")

TINY = TransformerConfig(
    in_channels=8, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
)
H, W, N_TXT = 3, 4, 5


def reference_model(cfg: TransformerConfig, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = dataclasses.asdict(cfg)
    kwargs["axes_dims_rope"] = list(kwargs["axes_dims_rope"])
    model = diffusers.Flux2Transformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Default init leaves norms at 1; perturb every tensor so a mis-wired key cannot hide.
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return model


def inputs(cfg: TransformerConfig, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, H * W, cfg.in_channels, generator=g)
    ctx = torch.randn(batch, N_TXT, cfg.joint_attention_dim, generator=g)
    sigma = torch.tensor([0.9580854, 0.3])[:batch]
    return x, ctx, sigma, latents.img_ids(H, W), latents.txt_ids(N_TXT)


def run_reference(model, x, ctx, sigma, img_ids, txt_ids):
    with torch.no_grad():
        return model(hidden_states=x, encoder_hidden_states=ctx, timestep=sigma, img_ids=img_ids, txt_ids=txt_ids,
                     return_dict=False)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_module_keys_equal_diffusers_keys():
    ref = reference_model(TINY)
    with torch.device("meta"):
        ours = Flux2Transformer(TINY)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


def test_dense_fp32_matches_diffusers():
    ref = reference_model(TINY)
    model = load_transformer(dict(ref.state_dict()), TINY)
    args = inputs(TINY)
    with torch.no_grad():
        out = model(*args)
    expected = run_reference(ref, *args)
    assert out.shape == (2, H * W, TINY.in_channels)
    assert rel_err(out, expected) <= 1e-4


def test_batch_elements_are_independent():
    ref = reference_model(TINY)
    model = load_transformer(dict(ref.state_dict()), TINY)
    x, ctx, sigma, img_ids, txt_ids = inputs(TINY)
    with torch.no_grad():
        both = model(x, ctx, sigma, img_ids, txt_ids)
        second = model(x[1:], ctx[1:], sigma[1:], img_ids, txt_ids)
    assert rel_err(both[1:], second) <= 1e-5


def test_bf16_close_to_diffusers_bf16_and_fp32():
    ref = reference_model(TINY)
    model = load_transformer(dict(ref.state_dict()), TINY, dtype=torch.bfloat16)
    x, ctx, _, img_ids, txt_ids = inputs(TINY)
    # sigma * 1000 exact in bf16, so the fp32 comparison measures matmul rounding, not timestep rounding.
    sigma = torch.tensor([0.5, 0.25])
    fp32 = run_reference(ref, x, ctx, sigma, img_ids, txt_ids)
    ref_bf16 = ref.to(torch.bfloat16)
    with torch.no_grad():
        out = model(x.bfloat16(), ctx.bfloat16(), sigma.bfloat16(), img_ids, txt_ids)
    expected = run_reference(ref_bf16, x.bfloat16(), ctx.bfloat16(), sigma.bfloat16(), img_ids, txt_ids)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 2e-2
    assert rel_err(out, fp32) <= 5e-2


def standin_lowbit(dense: torch.Tensor, kind: str, group_size: int = 128):
    """The LowBitWeight contract built with numpy (packbits, LSB-first along `in`), independent of bonsai.quant."""
    w = dense.detach().float().numpy()
    out, k = w.shape
    groups = w.reshape(out, k // group_size, group_size)
    scales = np.abs(groups).mean(-1).astype(np.float32) + 1e-3  # [out, groups]
    if kind == "binary":
        t = np.where(groups >= 0, 1, -1).reshape(out, k)
        packed = np.packbits(((t + 1) // 2).astype(np.uint8), axis=1, bitorder="little")
        bits = 1
    else:
        t = np.clip(np.round(groups / scales[..., None]), -1, 1).astype(np.int64).reshape(out, k)
        q = (t + 1).astype(np.uint8).reshape(out, k // 4, 4)
        packed = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
        bits = 2
    deq = (t.reshape(out, k // group_size, group_size) * scales[..., None]).reshape(out, k)
    return types.SimpleNamespace(
        kind=kind, shape=(out, k), group_size=group_size, bits=bits, packed=torch.from_numpy(packed),
        scales=torch.from_numpy(scales), dequantize=lambda dtype=torch.float32: torch.from_numpy(deq).to(dtype),
    )


def real_lowbit(dense, kind):
    try:
        from bonsai.quant import LowBitWeight
    except ImportError:
        pytest.skip("bonsai.quant.LowBitWeight has not landed yet")
    return LowBitWeight.quantize(dense, kind)


def _lowbit_state(ref, cfg, kind, make=standin_lowbit):
    state, big = {}, 0
    for key, value in ref.state_dict().items():
        # The released packs quantize the block linears; embedders, modulation and proj_out stay dense.
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")) and value.ndim == 2:
            state[key] = make(value, kind)
            big += 1
        else:
            state[key] = value
    assert big == cfg.num_layers * 12 + cfg.num_single_layers * 2
    return state


@pytest.mark.parametrize("make", [standin_lowbit, real_lowbit], ids=["standin", "bonsai.quant"])
@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_lowbit_linear_matches_dequantized_matmul(kind, make):
    g = torch.Generator().manual_seed(0)
    weight = make(torch.randn(24, 256, generator=g), kind)
    x = torch.randn(3, 5, 256, generator=g)
    layer = LowBitLinear(weight)
    assert layer.packed.dtype == torch.uint8 and layer.packed.shape == (24, 256 * weight.bits // 8)
    assert torch.equal(layer.dense(torch.float32), weight.dequantize(torch.float32))
    assert torch.equal(layer.dense(torch.bfloat16), weight.dequantize(torch.bfloat16))
    expected = x.double() @ weight.dequantize(torch.float64).T
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert rel_err(layer(x.bfloat16()), expected) <= 1e-2


@pytest.mark.parametrize("make", [standin_lowbit, real_lowbit], ids=["standin", "bonsai.quant"])
@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_lowbit_matches_diffusers_with_dequantized_weights(kind, make):
    cfg = dataclasses.replace(TINY, attention_head_dim=64, axes_dims_rope=(16, 16, 16, 16))  # K multiple of 128
    ref = reference_model(cfg)
    state = _lowbit_state(ref, cfg, kind, make)
    model = load_transformer(state, cfg)
    lowbit_modules = [m for m in model.modules() if isinstance(m, LowBitLinear)]
    assert len(lowbit_modules) == cfg.num_layers * 12 + cfg.num_single_layers * 2
    assert not any(isinstance(m, torch.nn.Linear) for m in model.transformer_blocks.modules())
    with torch.no_grad():
        dense = {k: (v if isinstance(v, torch.Tensor) else v.dequantize(torch.float32)) for k, v in state.items()}
        ref.load_state_dict(dense)
    args = inputs(cfg)
    with torch.no_grad():
        out = model(*args)
    assert rel_err(out, run_reference(ref, *args)) <= 1e-4


def test_make_linear_hook_receives_lowbit_weights():
    cfg = dataclasses.replace(TINY, num_layers=1, num_single_layers=1, attention_head_dim=64,
                              axes_dims_rope=(16, 16, 16, 16))
    state = _lowbit_state(reference_model(cfg), cfg, "ternary")
    seen = []

    def make_linear(weight, device=None, dtype=None):
        seen.append((tuple(weight.shape), torch.device(device), dtype))
        return LowBitLinear(weight, device=device, dtype=dtype)

    model = load_transformer(state, cfg, dtype=torch.bfloat16, make_linear=make_linear)
    assert len(seen) == 14
    assert all(d == torch.device("cpu") and t == torch.bfloat16 for _, d, t in seen)
    assert model.x_embedder.weight.dtype == torch.bfloat16


def test_strict_loading_names_keys():
    state = dict(reference_model(TINY).state_dict())
    missing = dict(state)
    del missing["transformer_blocks.1.attn.to_k.weight"]
    with pytest.raises(ValueError, match=r"missing \['transformer_blocks.1.attn.to_k.weight'\]"):
        load_transformer(missing, TINY)
    extra = dict(state, **{"time_guidance_embed.guidance_embedder.linear_1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected .*guidance_embedder"):
        load_transformer(extra, TINY)
    bad = dict(state, **{"proj_out.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match=r"proj_out.weight: expected \(8, 32\), got \(3, 3\)"):
        load_transformer(bad, TINY)
    wide = dataclasses.replace(TINY, attention_head_dim=64, axes_dims_rope=(16, 16, 16, 16))
    lowbit_norm = dict(reference_model(wide).state_dict())
    lowbit_norm["x_embedder.weight"] = standin_lowbit(torch.zeros(128, 128), "binary")
    with pytest.raises(ValueError, match=r"x_embedder.weight: expected \(128, 8\), got \(128, 128\)"):
        load_transformer(lowbit_norm, wide)
