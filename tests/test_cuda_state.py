"""CUDA state owned by objects, checked on the CPU: the expand workspace, the layers built against it (same buffers
as the torch backend's), and the transformer's precomputed-RoPE call that graph capture uses."""

from __future__ import annotations

import math

import pytest
import torch

from bonsai.backends.cuda.choice import GemmChoices, GemmKey
from bonsai.backends.cuda.linear import FastInt4Linear, FastLowBitLinear, Workspace, make_linear_factory, workspaces
from bonsai.backends.torch.linear import Int4Linear, LowBitLinear
from bonsai.errors import BonsaiValueError
from bonsai.quant.lowbit import LowBitWeight
from bonsai.quant.qwen4bit import Int4Weight


def lowbit(out_f, in_f, kind="ternary", seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (out_f, in_f), generator=g, dtype=torch.int8)
    if kind == "binary":
        codes = torch.where(codes == 0, torch.ones_like(codes), codes)
    return LowBitWeight.from_codes(codes, torch.rand(out_f, in_f // 128, generator=g) + 0.5, kind)


def int4(out_f, in_f, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Int4Weight(torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8),
                      torch.rand(out_f, in_f // 64, generator=g).half(), torch.full((out_f, in_f // 64), 7.5).half(), 64)


def test_workspace_buffers_per_dtype_grown_to_the_largest_call():
    ws = Workspace("cpu")
    assert ws.buffers() == [] and ws.numel == 0
    ws.require(1000)
    ws.require(300)  # the largest layer counts
    assert ws.numel == 1000 and ws.buffers() == []  # require allocates nothing
    a = ws.buffer(torch.bfloat16, 300)
    assert a.shape == (300,) and a.dtype == torch.bfloat16 and a.device.type == "cpu"
    assert ws.buffer(torch.bfloat16, 10).data_ptr() == a.data_ptr()  # reused, not re-made
    b = ws.buffer(torch.float8_e4m3fn, 1000)
    assert b.numel() == 1000 and b.dtype == torch.float8_e4m3fn and len(ws.buffers()) == 2
    bigger = ws.buffer(torch.bfloat16, 5000)  # grown: the smaller one is dropped
    assert bigger.numel() == 5000 and len(ws.buffers()) == 2
    assert not any(t is a for t in ws.buffers())


def test_two_workspaces_are_independent_and_release_drops_buffers():
    ws1, ws2 = Workspace("cpu"), Workspace("cpu")
    ws1.require(64)
    ws2.require(128)
    a, b = ws1.buffer(torch.float32, 64), ws2.buffer(torch.float32, 128)
    assert a.numel() == 64 and b.numel() == 128 and a.data_ptr() != b.data_ptr()
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(ws1.buffer(torch.float32, 64) == 1.0) and torch.all(ws2.buffer(torch.float32, 64) == 2.0)
    kept = ws1.buffers()
    ws1.release()
    assert ws1.buffers() == [] and ws1.numel == 64  # the layers' record stays
    assert [t.data_ptr() for t in ws2.buffers()] == [b.data_ptr()]  # the other workspace is untouched
    again = ws1.buffer(torch.float32, 64)
    assert again.numel() == 64 and not any(again is t for t in kept)


def test_fast_layers_register_their_size_and_keep_the_torch_buffers():
    ws, choices = Workspace("cpu"), GemmChoices()
    w = lowbit(256, 384)
    fast = FastLowBitLinear(w, device="cpu", workspace=ws, choices=choices)
    ref = LowBitLinear(w, device="cpu")
    assert ws.numel == 256 * 384 and ws.buffers() == []
    assert fast.state_dict().keys() == ref.state_dict().keys()
    for (name, t), (ref_name, r) in zip(fast.named_buffers(), ref.named_buffers()):
        assert name == ref_name and t.dtype == r.dtype and torch.equal(t, r)
    assert fast.gemm_key(4608, torch.bfloat16) == GemmKey("auto", "bfloat16", 2, 256, 384, 4608)
    fp8 = FastLowBitLinear(w, device="cpu", linear="fused", activations="fp8", workspace=ws, choices=choices)
    assert fp8.gemm_key(7, torch.bfloat16) == GemmKey("fused", "fp8", 2, 256, 384, 7)
    # fp8 "expand" is cuBLAS's block-scaled GEMM, which torch runs on Hopper only: elsewhere it is refused upfront.
    with pytest.raises(BonsaiValueError, match=r"linear='expand' with activations='fp8'.*sm_90"):
        FastLowBitLinear(w, device="cpu", linear="expand", activations="fp8", workspace=ws, choices=choices)

    w4 = int4(320, 512)
    fast4, ref4 = FastInt4Linear(w4, device="cpu", workspace=ws), Int4Linear(w4, device="cpu")
    assert ws.numel == 320 * 512  # the larger of the two layers
    assert fast4.state_dict().keys() == ref4.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(fast4.buffers(), ref4.buffers()))


def test_factory_builds_layers_sharing_the_runtime_state():
    ws, choices = Workspace("cpu"), GemmChoices()
    make = make_linear_factory("expand", workspace=ws, choices=choices)
    layers = torch.nn.ModuleList([make(lowbit(128, 256), device="cpu", dtype=torch.float32),
                                  make(lowbit(384, 128, "binary"), device="cpu", dtype=torch.float32),
                                  FastInt4Linear(int4(64, 128), device="cpu", workspace=Workspace("cpu"))])
    assert all(layer.workspace is ws and layer.choices is choices for layer in layers[:2])
    assert layers[0].linear == "expand" and layers[1].bits == 1
    found = workspaces(layers)
    assert len(found) == 2 and found[0] is ws and found[1] is layers[2].workspace


def test_fast_layers_reject_missing_or_foreign_state():
    w = lowbit(128, 128)
    with pytest.raises(BonsaiValueError, match="workspace must be a Workspace, got NoneType"):
        FastLowBitLinear(w, device="cpu", workspace=None, choices=GemmChoices())
    with pytest.raises(BonsaiValueError, match="choices must be a GemmChoices, got dict"):
        FastLowBitLinear(w, device="cpu", workspace=Workspace("cpu"), choices={})
    with pytest.raises(BonsaiValueError, match="workspace is on meta, the layer on cpu"):
        FastLowBitLinear(w, device="cpu", workspace=Workspace("meta"), choices=GemmChoices())
    with pytest.raises(TypeError, match="workspace"):
        FastInt4Linear(int4(64, 128), device="cpu")  # keyword-only and required
    with pytest.raises(BonsaiValueError, match="linear must be"):
        FastLowBitLinear(w, device="cpu", linear="gemlite", workspace=Workspace("cpu"), choices=GemmChoices())


def test_transformer_takes_precomputed_rope():
    """forward(..., rope=model.rope(ids)) is forward(..., img_ids, txt_ids); the tables are really used."""
    from bonsai import latents
    from bonsai.backends.torch.transformer import Flux2Transformer
    from bonsai.config import TransformerConfig

    cfg = TransformerConfig(in_channels=8, num_layers=1, num_single_layers=1, attention_head_dim=16,
                            num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32,
                            axes_dims_rope=(4, 4, 4, 4))
    torch.manual_seed(0)
    model = Flux2Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / math.sqrt(p.shape[-1]))
    g = torch.Generator().manual_seed(1)
    x, c = torch.randn(1, 12, 8, generator=g), torch.randn(1, 5, 24, generator=g)
    t = torch.tensor([0.6])
    img, txt = latents.img_ids(3, 4), latents.txt_ids(5)
    rope = model.rope(img, txt, "cpu")
    assert rope.dtype == torch.complex64 and rope.shape == (5 + 12, cfg.attention_head_dim // 2)
    with torch.no_grad():
        by_ids = model(x, c, t, img, txt)
        by_rope = model(x, c, t, rope=rope)
        moved = model(x, c, t, rope=model.rope(latents.img_ids(4, 3), txt, "cpu"))
    assert torch.equal(by_ids, by_rope)
    assert not torch.allclose(by_rope, moved, atol=1e-3)  # other positions, other output: rope is not ignored
