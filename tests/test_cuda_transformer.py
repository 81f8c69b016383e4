"""The transformer with CUDA linears equals the torch reference backend (same random low-bit weights)."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TINY = dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=64,
            axes_dims_rope=(16, 16, 16, 16), joint_attention_dim=256)
REAL_WIDTH_FEW_LAYERS = dict(num_layers=1, num_single_layers=2)  # klein 4B widths, 3 of 25 blocks


def _lowbit(codes, scales, kind):
    from bonsai.quant.lowbit import LowBitWeight

    return LowBitWeight.from_codes(codes, scales, kind)


def random_tensors(cfg, kind, seed=0):
    """diffusers-keyed dict: LowBitWeight for the block linears (the ones Bonsai quantizes), dense otherwise."""
    from bonsai.backends.torch.transformer import Flux2Transformer

    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if key.endswith("norm_q.weight") or key.endswith("norm_k.weight") or "norm_added" in key:
            out[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.startswith(("transformer_blocks.", "single_transformer_blocks.")) and len(shape) == 2:
            n, k = shape
            if kind == "ternary":
                codes = torch.randint(-1, 2, shape, generator=g, dtype=torch.int8)
            else:
                codes = torch.randint(0, 2, shape, generator=g, dtype=torch.int8) * 2 - 1
            scales = (torch.rand(n, k // 128, generator=g) + 0.5) / math.sqrt(k)
            out[key] = _lowbit(codes, scales, kind)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 1
            out[key] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return out


def inputs(cfg, h=8, w=8, n_txt=32, seed=1):
    from bonsai import latents

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, h * w, cfg.in_channels, generator=g)
    c = torch.randn(1, n_txt, cfg.joint_attention_dim, generator=g)
    t = torch.tensor([0.7])
    return x, c, t, latents.img_ids(h, w), latents.txt_ids(n_txt)


def fast_linears(linear, activations=None):
    """make_linear for our CUDA linears with a fresh workspace and choice table (what one runtime holds)."""
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import Workspace, make_linear_factory

    return make_linear_factory(linear, activations, workspace=Workspace("cuda"), choices=GemmChoices())


def run(model, args, dtype):
    x, c, t, img, txt = args
    with torch.inference_mode():
        return model(x.cuda().to(dtype), c.cuda().to(dtype), t.cuda().to(dtype), img.cuda(), txt.cuda()).float()


@pytest.fixture(scope="module", autouse=True)
def gemlite_autotune_cache():
    """Reuse (and extend) the per-GPU gemlite autotune cache, as CudaRuntime does."""
    try:
        import gemlite  # noqa: F401
    except ImportError:
        yield
        return
    from bonsai.backends.cuda import gemlite as glb

    glb.load_autotune(glb.autotune_cache_path())
    yield
    glb.save_autotune(glb.autotune_cache_path())


@pytest.mark.parametrize("kind", ["ternary", "binary"])
@pytest.mark.parametrize("linear", ["auto", "expand", "fused", "gemlite", "gemlite_released"])
@pytest.mark.parametrize("size", ["tiny", "real_width"])
def test_cuda_transformer_matches_torch_backend(kind, linear, size):
    if linear.startswith("gemlite"):
        pytest.importorskip("gemlite")
    from bonsai.backends.torch.linear import LowBitLinear
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.config import TransformerConfig
    from bonsai.quant.lowbit import LowBitWeight

    cfg = TransformerConfig(**(TINY if size == "tiny" else REAL_WIDTH_FEW_LAYERS))
    tensors = random_tensors(cfg, kind)
    args = inputs(cfg, h=8, w=8, n_txt=32) if size == "tiny" else inputs(cfg, h=32, w=32, n_txt=512)
    dtype = torch.bfloat16
    ref_model = load_transformer(tensors, cfg, device="cuda", dtype=dtype, make_linear=LowBitLinear)
    ref = run(ref_model, args, dtype)
    del ref_model
    if linear == "gemlite_released":
        # The released gemlite layout, loaded as stored (what CudaRuntime does for gemlite repos).
        from bonsai.backends.cuda.gemlite import GemliteState

        tensors = {k: GemliteState(v.to_gemlite()) if isinstance(v, LowBitWeight) else v for k, v in tensors.items()}
        linear = "gemlite"
    model = load_transformer(tensors, cfg, device="cuda", dtype=dtype, make_linear=fast_linears(linear))
    y = run(model, args, dtype)
    assert torch.isfinite(y).all()
    err = ((y - ref).norm() / ref.norm()).item()
    assert err < 1e-2, err


@pytest.mark.parametrize("kind", ["ternary", "binary"])
def test_cuda_transformer_fp8_activations(kind):
    """fp8 activations are an approximation: the error against the bf16 torch backend is reported, and bounded
    loosely so that a broken scale or layout (errors of order 1) fails."""
    from bonsai.backends.torch.linear import LowBitLinear
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.config import TransformerConfig

    cfg = TransformerConfig(**REAL_WIDTH_FEW_LAYERS)
    tensors = random_tensors(cfg, kind)
    args = inputs(cfg, h=32, w=32, n_txt=512)
    dtype = torch.bfloat16
    ref = run(load_transformer(tensors, cfg, device="cuda", dtype=dtype, make_linear=LowBitLinear), args, dtype)
    errs = {}
    for linear in ("expand", "fused"):
        model = load_transformer(tensors, cfg, device="cuda", dtype=dtype,
                                 make_linear=fast_linears(linear, activations="fp8"))
        y = run(model, args, dtype)
        assert torch.isfinite(y).all()
        errs[linear] = ((y - ref).norm() / ref.norm()).item()
    print(f"fp8 activations, {kind}, 3 real-width blocks: rel err vs bf16 torch backend {errs}")
    assert max(errs.values()) < 0.1, errs


@pytest.mark.parametrize("linear", ["auto", "gemlite"])
def test_graphed_forward_replays_the_eager_forward(linear):
    """GraphedForward (rope passed in, no patching of the model) equals the eager forward; new ids refresh its
    RoPE buffer; a released workspace does not break replay (the graph keeps its buffers alive)."""
    if linear == "gemlite":
        pytest.importorskip("gemlite")
    from bonsai import latents
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import Workspace, make_linear_factory
    from bonsai.backends.cuda.runtime import GraphedForward
    from bonsai.backends.torch.runtime import Cond
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.config import TransformerConfig

    cfg = TransformerConfig(**TINY)
    dtype = torch.bfloat16
    ws = Workspace("cuda")
    model = load_transformer(random_tensors(cfg, "ternary"), cfg, device="cuda", dtype=dtype,
                             make_linear=make_linear_factory(linear, workspace=ws, choices=GemmChoices()))
    x, c, t, img, txt = (a.cuda() for a in inputs(cfg, h=8, w=8, n_txt=32))
    x, c, t = x.to(dtype), c.to(dtype), t.to(dtype)
    with torch.inference_mode():
        run = GraphedForward(model, tuple(x.shape), Cond(c, model.rope(img, txt, "cuda")), dtype)
        eager = model(x, c, t, img, txt).float()
        got = run(x, float(t[0])).float()
        assert ((got - eager).norm() / eager.norm()).item() < 1e-3
        # Other positions (a transposed 8x8 grid, shifted text ids), same shapes: set_context refreshes RoPE.
        img2, txt2 = img[:, [0, 2, 1, 3]].contiguous(), txt.clone()
        txt2[:, 3] += 5
        run.set_context(Cond(c, model.rope(img2, txt2, "cuda")))
        eager2 = model(x, c, t, img2, txt2).float()
        assert ((eager2 - eager).norm() / eager.norm()).item() > 1e-2  # the test can tell the two apart
        if linear != "gemlite":
            assert ws.buffers()  # the fast layers expanded into it
        ws.release()
        # Freed memory of the scratch's size would be handed to the next allocation of that size: replaying a
        # graph whose scratch was not kept alive would overwrite this probe.
        probe = torch.full((max(ws.numel, 1),), 7.0, device="cuda", dtype=dtype)
        got2 = run(x, float(t[0])).float()
        assert torch.all(probe == 7.0)
        other = torch.randn(1, 16 * 16, cfg.in_channels, device="cuda", dtype=dtype)
        model(other, c, t, latents.img_ids(16, 16).cuda(), txt2)  # eager at another size: the workspace is re-made
        got3 = run(x, float(t[0])).float()
    assert ((got2 - eager2).norm() / eager2.norm()).item() < 1e-3
    assert torch.equal(got3, got2)


@pytest.mark.parametrize("activations", [None, "fp8"])
def test_compiled_elementwise_matches_eager(activations):
    """CudaRuntime(compile=True): the elementwise steps (modulation, RoPE + attention) torch.compiled, the linears
    eager; the output equals the eager model's."""
    import dataclasses

    from bonsai.backends.torch.transformer import TORCH_OPS, Ops, load_transformer
    from bonsai.config import TransformerConfig

    cfg = TransformerConfig(**TINY)
    dtype = torch.bfloat16
    tensors = random_tensors(cfg, "binary")
    args = inputs(cfg, h=8, w=8, n_txt=32)
    ref = run(load_transformer(tensors, cfg, device="cuda", dtype=dtype,
                               make_linear=fast_linears("auto", activations)), args, dtype)
    ops = Ops(**{f.name: torch.compile(getattr(TORCH_OPS, f.name), dynamic=False) for f in dataclasses.fields(Ops)})
    model = load_transformer(tensors, cfg, device="cuda", dtype=dtype, make_linear=fast_linears("auto", activations),
                             ops=ops)
    y = run(model, args, dtype)
    assert torch.isfinite(y).all()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    if activations is None:
        assert rel(y, ref) < 1e-2
    else:
        # e4m3 keeps 3 mantissa bits: where the fused kernels round an activation differently in bf16, its fp8
        # value can move a whole step, so compiled and eager fp8 differ by more than bf16 noise. Both must stay
        # as close to the bf16 model as each other.
        bf16 = run(load_transformer(tensors, cfg, device="cuda", dtype=dtype, make_linear=fast_linears("auto")),
                   args, dtype)
        print(f"fp8: compiled vs eager {rel(y, ref):.4f}; vs bf16: eager {rel(ref, bf16):.4f}, "
              f"compiled {rel(y, bf16):.4f}")
        assert rel(y, ref) < 5e-2 and rel(y, bf16) < 1.5 * rel(ref, bf16) + 1e-3
    assert torch.equal(run(model, args, dtype), y)  # replaying the compiled code is deterministic


@pytest.fixture(scope="module")
def gemlite_repo(tmp_path_factory):
    from bonsai import testing

    return testing.write_repo(tmp_path_factory.mktemp("repo") / "ternary-gemlite", "gemlite", "ternary")


@pytest.mark.parametrize("linear", ["auto", "gemlite"])
def test_pipeline_renders_gemlite_repo_on_cuda(gemlite_repo, linear):
    if linear == "gemlite":
        pytest.importorskip("gemlite")
    import numpy as np

    from bonsai.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(gemlite_repo, backend="cuda", linear=linear)
    assert pipe.backend == "cuda" and pipe.runtime.linear == linear
    if linear == "gemlite":  # the released pack went into gemlite layers as stored (8-bit packing, fp32 meta)
        layer = pipe.runtime.transformer.transformer_blocks[0].attn.to_q
        assert type(layer).__name__ == "GemLiteLinearTriton" and layer.W_q.dtype == torch.uint8
    assert pipe.runtime.cuda_graphs  # the default: each step replays a captured forward
    pipe.warmup([(64, 64)])
    got = np.asarray(pipe("a red fox", width=64, height=64, steps=2, seed=3, progress=False).images[0], np.float32)
    eager_pipe = Pipeline.from_pretrained(gemlite_repo, backend="cuda", linear=linear, cuda_graphs=False)
    eager = np.asarray(eager_pipe("a red fox", width=64, height=64, steps=2, seed=3, progress=False).images[0],
                       np.float32)
    assert np.abs(got - eager).max() <= 1.0  # replay runs the same kernels as eager
    ref_pipe = Pipeline.from_pretrained(gemlite_repo, backend="torch", device="cuda", dtype=torch.bfloat16)
    ref = np.asarray(ref_pipe("a red fox", width=64, height=64, steps=2, seed=3, progress=False).images[0], np.float32)
    assert got.shape == (64, 64, 3) and got.std() > 1.0
    assert np.abs(got - ref).mean() < 3.0, np.abs(got - ref).mean()


def test_cuda_text_encoder_4bit_matches_dense(gemlite_repo):
    """The HQQ text encoder kept 4-bit (expanded per layer) gives the features of the dequantized bf16 one."""
    from bonsai import weights
    from bonsai.backends.cuda.linear import FastInt4Linear
    from bonsai.backends.cuda.runtime import CudaRuntime

    feats = {}
    for te in ("4bit", "dense"):
        rt = CudaRuntime.load(gemlite_repo, linear="expand", text_encoder=te, keep_text_encoder=True,
                              text_config=weights.text_encoder_config(gemlite_repo))
        model = rt.text_encoder.get()
        assert isinstance(model.layers[0].mlp.up_proj, FastInt4Linear) == (te == "4bit")
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (2, 64), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 40:] = 0
        feats[te] = rt.encode(ids, mask).float()
        del rt, model
    assert torch.isfinite(feats["4bit"]).all()
    err = ((feats["4bit"] - feats["dense"]).norm() / feats["dense"].norm()).item()
    assert err < 1e-3, err
    with pytest.raises(ValueError, match="text_encoder"):
        CudaRuntime.load(gemlite_repo, text_encoder="int8")
