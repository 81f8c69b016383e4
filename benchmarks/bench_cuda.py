"""CUDA kernel benchmark, one run, side by side: per-linear TFLOP/s and full 4B transformer steps.

    python benchmarks/bench_cuda.py --out benchmarks/results/h100

Per linear (every FLUX.2 klein 4B shape x M tokens): our GEMMs (Triton expand + cuBLAS, our fused Triton GEMM,
the per-shape "auto" pick, fp8 activations), gemlite with 8-bit packing (the released layout, loaded as stored),
dense cuBLAS bf16; `projections`: linears that read one input (q, k, v), one by one and as one GEMM. Per step:
the full 4B transformer (5 double + 20 single blocks, random weights built in memory) with each linear kind at
512^2 and 1024^2, eager and as one CUDA graph, with weights / steady / peak VRAM; a torch.profiler breakdown by
kernel category. Whole images through `bonsai.Pipeline` are benchmarked by bench_pipeline.py. Writes OUT.json and
OUT.md; prints rows as it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

FLUX_SHAPES = [  # (name, in, out)
    ("attn q/k/v/out", 3072, 3072),
    ("ff in (double)", 3072, 18432),
    ("ff out (double)", 9216, 3072),
    ("single qkv+mlp in", 3072, 27648),
    ("single out", 12288, 3072),
]
MS = [1, 64, 512, 1536, 4608]
SIZES = {"512": (512, 512), "1024": (1024, 1024)}
TEXT_TOKENS = 512


def random_lowbit(out_f, in_f, kind, gen):
    """A random packed binary/ternary LowBitWeight built on the GPU (speed does not depend on the values)."""
    from bonsai.quant.lowbit import LowBitWeight

    bits = 2 if kind == "ternary" else 1
    per = 8 // bits
    q = torch.randint(0, 3 if kind == "ternary" else 2, (out_f, in_f // per, per), generator=gen,
                      device="cuda", dtype=torch.uint8)  # [out, in / per, per] unsigned codes
    packed = torch.zeros(out_f, in_f // per, dtype=torch.uint8, device="cuda")
    for j in range(per):
        packed |= q[:, :, j] << (j * bits)
    scales = (torch.rand(out_f, in_f // 128, generator=gen, device="cuda") + 0.5) / math.sqrt(in_f)
    return LowBitWeight(kind, packed, scales)


def dense_weight(weight, dtype):
    from bonsai.backends.cuda.kernels import expand_lowbit

    w = torch.empty(weight.shape, device="cuda", dtype=dtype)
    return expand_lowbit(weight.packed, weight.scales, weight.bits, 128, weight.shape[1], w)


def gemlite_released(weight, device="cuda", dtype=torch.bfloat16):
    """gemlite layer from the released layout (8-bit packing, float32 meta), loaded as stored."""
    from bonsai.backends.cuda.gemlite import GemliteState, from_state

    return from_state(GemliteState(weight.to_gemlite()).state, device=device, dtype=dtype)


def dense_linear(weight, device="cuda", dtype=torch.bfloat16):
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(dense_weight(weight, dtype), requires_grad=False)
    return layer


def bench_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def tflops(m, k, n, ms):
    return 2 * m * k * n / (ms * 1e-3) / 1e12


def bench_linears(dtype, with_gemlite, kinds):
    """Every FLUX shape x M: dense cuBLAS, each of our GEMMs (best Triton config per shape), what linear="auto"
    picked, fp8 activations, gemlite; fp8's error is against the bf16 output on the same input."""
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.kernels import expand_lowbit, quantize_fp8
    from bonsai.backends.cuda.linear import FastLowBitLinear, Workspace, _run, blockwise_fp8, candidates

    gen = torch.Generator("cuda").manual_seed(0)
    ws, choices = Workspace("cuda"), GemmChoices()
    rows = []
    for kind in kinds:
        for name, k, n in FLUX_SHAPES:
            w = random_lowbit(n, k, kind, gen)
            auto = FastLowBitLinear(w, workspace=ws, choices=choices)
            auto8 = FastLowBitLinear(w, activations="fp8", workspace=ws, choices=choices)
            wd = dense_weight(w, dtype)
            gl = gemlite_released(w, dtype=dtype) if with_gemlite else None
            scratch = torch.empty(n, k, device="cuda", dtype=dtype)
            expand_ms = bench_ms(lambda: expand_lowbit(w.packed, w.scales, w.bits, 128, k, scratch))
            for m in MS:
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                x8 = quantize_fp8(x)
                s16, s8 = ws.buffer(dtype, n * k), ws.buffer(torch.float8_e4m3fn, n * k)
                run = {c: (lambda c=c: _run(c, x, w.packed, w.scales, w.bits, 128, k, s16))
                       for c in candidates("auto", False, m)}
                t = {c: bench_ms(fn) for c, fn in run.items()}
                sw = ws.buffer(torch.float32, n * k // 128)
                t8 = {c: bench_ms(lambda c=c: _run(c, x, w.packed, w.scales, w.bits, 128, k, s8, x8, sw))
                      for c in candidates("auto", True, m, blockwise_fp8(x.device, m, n))}
                fused = min((c for c in t if c.startswith("fused")), key=t.get)
                best8 = min(t8, key=t8.get)
                auto(x)  # measures and records the choice for this M
                auto8(x)
                picked = choices.get(auto.gemm_key(m, dtype))
                ref = F.linear(x, wd).float()
                err8 = ((auto8(x).float() - ref).norm() / ref.norm()).item()
                row = dict(kind=kind, linear=name, K=k, N=n, M=m, dense_ms=bench_ms(lambda: F.linear(x, wd)),
                           expand_cublas_ms=t["cublas"], fused_ms=t[fused], fused_config=fused,
                           auto_ms=bench_ms(lambda: auto(x)), auto_choice=picked,
                           fp8_ms=bench_ms(lambda: auto8(x)), fp8_choice=best8, fp8_rel_err=err8,
                           quantize_fp8_ms=bench_ms(lambda: quantize_fp8(x)), expand_ms=expand_ms, gemlite_ms=None)
                if gl is not None:
                    t0 = time.perf_counter()
                    gl(x)  # first call autotunes this (M bucket, N, K)
                    torch.cuda.synchronize()
                    row["gemlite_first_call_s"] = time.perf_counter() - t0
                    row["gemlite_ms"] = bench_ms(lambda: gl(x))
                for impl in ("dense", "expand_cublas", "fused", "auto", "fp8", "gemlite"):
                    ms = row[f"{impl}_ms"]
                    row[f"{impl}_tflops"] = tflops(m, k, n, ms) if ms else None
                rows.append(row)
                print(f"{kind:8s} {k:5d}->{n:5d} M={m:5d}  TFLOP/s dense {row['dense_tflops']:6.1f}  expand+cuBLAS "
                      f"{row['expand_cublas_tflops']:6.1f}  fused {row['fused_tflops']:6.1f}  auto {row['auto_tflops']:6.1f}"
                      f" ({picked})  fp8 {row['fp8_tflops']:6.1f} ({best8}, err {err8:.2e})  gemlite "
                      f"{row['gemlite_tflops'] or float('nan'):6.1f}", flush=True)
    return rows


def bench_projections(dtype, kinds):
    """Linears that read one input, one by one and together as one GEMM over their weights side by side
    (`project`, what the models run), beside dense cuBLAS on resident bf16 weights one by one; replayed from CUDA
    graphs as the runtime runs them. A double block stream's q, k, v (3072 -> 3 x 3072) at the text's M (512) and
    the image's (1024 at 512x512, 4096 at 1024x1024), bf16 and fp8 activations; the text encoder's 4-bit q, k, v
    (2560 -> 4096 + 2 x 1024) and gate, up (2560 -> 2 x 9728) at its 512 tokens."""
    from expand_study import graph_ms

    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import FastInt4Linear, FastLowBitLinear, Workspace
    from bonsai.backends.torch.linear import project
    from bonsai.quant.qwen4bit import Int4Weight

    gen = torch.Generator("cuda").manual_seed(0)
    ws, choices = Workspace("cuda"), GemmChoices()

    def int4(n, k):
        packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
        scale, zero = (torch.rand(n, k // 64, generator=gen, device="cuda").to(dtype) for _ in range(2))
        return FastInt4Linear(Int4Weight(packed, scale, zero, 64), device="cuda", workspace=ws)

    cases = []  # (group, activations, layers, M list)
    for kind in kinds:
        weights = [random_lowbit(3072, 3072, kind, gen) for _ in range(3)]
        for acts in (None, "fp8"):
            layers = [FastLowBitLinear(w, activations=acts, workspace=ws, choices=choices) for w in weights]
            cases.append((f"{kind} q, k, v", acts, layers, (512, 1024, 4096)))
    cases += [("4-bit text q, k, v", None, [int4(n, 2560) for n in (4096, 1024, 1024)], (512,)),
              ("4-bit text gate, up", None, [int4(9728, 2560) for _ in range(2)], (512,))]
    rows = []
    for group, acts, layers, ms in cases:
        dense = [layer.dense(dtype) for layer in layers]
        for m in ms:
            x = torch.randn(1, m, layers[0].in_features, device="cuda", dtype=dtype)
            apart = [layer(x) for layer in layers]  # also measures each layer's choice
            together = project(x, layers)
            err = max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(together, apart))
            row = dict(group=group, activations=acts or str(dtype).removeprefix("torch."), M=m,
                       dense_ms=graph_ms(lambda: [F.linear(x, w) for w in dense]),
                       apart_ms=graph_ms(lambda: [layer(x) for layer in layers]),
                       together_ms=graph_ms(lambda: project(x, layers)), rel_diff=err)
            rows.append(row)
            print(f"{group:20s} {row['activations']:8s} M={m:5d}  dense {row['dense_ms'] * 1e3:6.1f} us  one by one "
                  f"{row['apart_ms'] * 1e3:6.1f} us  together {row['together_ms'] * 1e3:6.1f} us  (rel diff {err:.1e})",
                  flush=True)
    return rows


def random_model_tensors(cfg, kind, seed=0):
    """diffusers-keyed random 4B transformer on the CPU: LowBitWeight for the 100 block linears, bf16 otherwise."""
    from bonsai.backends.torch.transformer import Flux2Transformer

    with torch.device("meta"):
        model = Flux2Transformer(cfg)
    gen = torch.Generator("cuda").manual_seed(seed)
    out = {}
    for key, meta in model.state_dict().items():
        shape = tuple(meta.shape)
        if key.startswith(("transformer_blocks.", "single_transformer_blocks.")) and len(shape) == 2:
            out[key] = random_lowbit(shape[0], shape[1], kind, gen).to("cpu")
        elif len(shape) == 2:
            out[key] = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) / math.sqrt(shape[1])).cpu()
        else:
            out[key] = (1 + 0.1 * torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16)).cpu()
    return out


def linear_makers(dtype, workspace, choices):
    """make_linear per impl; ours share `workspace` and `choices` (what one CudaRuntime holds)."""
    from bonsai.backends.cuda.linear import make_linear_factory

    def dense(w, device="cuda", dtype=dtype):
        return dense_linear(w.to(device), device=device, dtype=dtype)

    def ours(linear, activations=None):
        return make_linear_factory(linear, activations, workspace=workspace, choices=choices)

    return {"ours": ours("auto"), "ours_expand": ours("expand"), "ours_fused": ours("fused"),
            "ours_fp8": ours("auto", "fp8"), "ours_torchops": ours("auto"), "gemlite": gemlite_released,
            "dense_bf16": dense}


def impl_ops(impl):
    """The elementwise ops a Pipeline with these linears runs (elementwise="triton", the default); ours_torchops:
    elementwise="torch"."""
    from bonsai.backends.cuda.runtime import TRITON_OPS
    from bonsai.backends.torch.transformer import TORCH_OPS

    return TORCH_OPS if impl == "ours_torchops" else TRITON_OPS


def gb(nbytes) -> float:
    return nbytes / 1e9


def timed(fn, n) -> list[float]:
    """Seconds of each of n synchronized calls of fn."""
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def graphed_step_ms(model, args, reps) -> float:
    """Median step time replaying one CUDA graph of the forward (no CPU launch cost), as CudaRuntime runs it."""
    from bonsai.backends.cuda.runtime import GraphedForward
    from bonsai.backends.torch.runtime import Cond

    x, c, t, img, txt = args
    with torch.inference_mode():
        run = GraphedForward(model, tuple(x.shape), Cond(c, model.rope(img, txt, x.device)), x.dtype)
        times = timed(lambda: run(x, float(t[0])), reps)
    del run
    return statistics.median(times) * 1e3


def bench_steps(dtype, impls, kinds, reps=7):
    from bonsai import latents
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import Workspace
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.config import KLEIN_4B

    ws = Workspace("cuda")
    makers = linear_makers(dtype, ws, GemmChoices())
    rows, refs = [], {}
    for kind in kinds:
        tensors = random_model_tensors(KLEIN_4B, kind)
        for impl in impls:
            ws.release()
            gc.collect()  # the previous model may sit in a reference cycle
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            model = load_transformer(tensors, KLEIN_4B, device="cuda", dtype=dtype, make_linear=makers[impl],
                                     ops=impl_ops(impl))
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated() - base
            for hgt, wid in SIZES.values():
                h, w = latents.latent_size(hgt, wid)
                gen = torch.Generator("cuda").manual_seed(1)  # the same inputs for every impl
                x = torch.randn(1, h * w, 128, device="cuda", dtype=dtype, generator=gen)
                c = torch.randn(1, TEXT_TOKENS, 7680, device="cuda", dtype=dtype, generator=gen)
                t = torch.full((1,), 0.5, device="cuda", dtype=dtype)
                img, txt = latents.img_ids(h, w).cuda(), latents.txt_ids(TEXT_TOKENS).cuda()
                ws.release()  # so the scratch allocation shows in this size's peak
                gc.collect()
                torch.cuda.reset_peak_memory_stats()
                with torch.inference_mode():
                    times = timed(lambda: model(x, c, t, img, txt), reps + 1)
                # steady: what stays allocated between steps (weights + scratch); peak: inside a step.
                steady, peak = torch.cuda.memory_allocated() - base, torch.cuda.max_memory_allocated() - base
                with torch.inference_mode():
                    y = model(x, c, t, img, txt).float()
                ref = refs.setdefault((kind, hgt), y)  # the first impl's output: the 25 blocks' error against it
                rel_err = ((y - ref).norm() / ref.norm()).item()
                graph_ms = graphed_step_ms(model, (x, c, t, img, txt), reps)
                row = dict(kind=kind, impl=impl, size=f"{hgt}x{wid}", first_step_s=times[0],
                           step_ms=statistics.median(times[1:]) * 1e3, graph_step_ms=graph_ms, steps_measured=reps,
                           weights_gb=gb(resident), steady_gb=gb(steady), peak_gb=gb(peak), rel_err_vs_first=rel_err)
                rows.append(row)
                print(f"step {kind:8s} {impl:10s} {row['size']:9s} first {times[0]:6.2f} s  median "
                      f"{row['step_ms']:7.1f} ms  graphed {graph_ms:7.1f} ms  weights {row['weights_gb']:5.2f} GB  steady {row['steady_gb']:5.2f}"
                      f" GB  peak {row['peak_gb']:5.2f} GB", flush=True)
                del x, c
            del model
        del tensors
    ws.release()
    torch.cuda.empty_cache()
    return rows


def kernel_category(name: str) -> str:
    n = name.lower()
    if "expand" in n:
        return "expand (ours)"
    if "gemm" in n and "gemlite" not in n or any(k in n for k in ("nvjet", "cutlass", "sm90_xmma", "cublas")):
        return "GEMM (cuBLAS)"
    if any(k in n for k in ("flash", "fmha", "attention", "cudnn", "softmax")):
        return "attention (SDPA)"
    if "gemlite" in n or "gemm" in n:
        return "GEMM (gemlite)"
    return "other (norms, RoPE, modulation, copies)"


def profile_categories(prof, categorize, top=10):
    """torch.profiler GPU time -> ({category: ms}, the `top` kernels of the last category as [name, ms, calls])."""
    cats: dict[str, float] = {}
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)
        if us and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            cat = categorize(e.key)
            cats[cat] = cats.get(cat, 0.0) + us / 1e3
            if cat.startswith("other"):
                kernels.append([e.key[:90], us / 1e3, e.count])
    return cats, sorted(kernels, key=lambda k: -k[1])[:top]


def vae_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "softmax")):  # before "cutlass": fmha_cutlassF
        return "attention"
    if any(k in n for k in ("conv", "implicit", "xmma", "sm90", "cutlass", "nvjet", "gemm", "winograd", "fft")):
        return "convolution"
    if any(k in n for k in ("group_norm", "stats", "combine", "normalize", "reduce", "welford")):
        return "group norm"
    return "other (SiLU, adds, upsample, copies)"


def bench_vae(dtype, reps=5):
    """The full-size VAE decoder (random weights) at 512^2 and 1024^2: the torch ops, our Triton GroupNorm + SiLU
    alone ("triton norm"), and every Triton VAE op (the norm, the conv biases folded into the pass after them, the
    upsampling, the attention as GEMMs around a Triton softmax: what elementwise="triton" runs, channels_last; and
    the same with torch's SDPA attention), NCHW vs channels_last convolutions; median decode time and a GPU-time
    breakdown (the attention's GEMMs count as convolution)."""
    from torch.profiler import ProfilerActivity, profile

    from bonsai.backends.cuda.runtime import TRITON_VAE_OPS, vae_norm_act
    from bonsai.backends.torch.vae import TORCH_VAE_OPS, VaeOps, load_vae_decoder
    from bonsai.config import VAEConfig
    from bonsai.testing import random_vae

    cfg = VAEConfig()
    state = random_vae(cfg)
    rows = []
    nchw, cl = ("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)
    # our GroupNorm + SiLU in every norm (the resnets' second norm too), torch's convs, bias adds and upsampling
    norm_only = VaeOps(norm_act=vae_norm_act, conv_norm_act=lambda conv, norm, x, silu: vae_norm_act(norm, conv(x), silu))
    sdpa = replace(TRITON_VAE_OPS, attention=TORCH_VAE_OPS.attention)
    variants = [("torch", TORCH_VAE_OPS, nchw), ("torch", TORCH_VAE_OPS, cl), ("triton norm", norm_only, nchw),
                ("triton norm", norm_only, cl), ("triton, sdpa", sdpa, cl), ("triton", TRITON_VAE_OPS, cl)]
    for norm_name, ops, (fmt_name, fmt) in variants:
        vae = load_vae_decoder(state, cfg, device="cuda", dtype=dtype, ops=ops).to(memory_format=fmt)
        for hgt, wid in SIZES.values():
            z = torch.randn(1, cfg.latent_channels, hgt // 8, wid // 8, device="cuda", dtype=dtype)
            torch.cuda.reset_peak_memory_stats()
            with torch.inference_mode():
                times = timed(lambda: vae(z), reps + 1)
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    vae(z)
                    torch.cuda.synchronize()
            cats, other = profile_categories(prof, vae_category)
            row = dict(norm=norm_name, layout=fmt_name, size=f"{hgt}x{wid}", first_s=times[0],
                       decode_ms=statistics.median(times[1:]) * 1e3, peak_gb=gb(torch.cuda.max_memory_allocated()),
                       gpu_ms=sum(cats.values()), **cats, top_other=other)
            rows.append(row)
            print(f"vae {norm_name:6s} {fmt_name:13s} {row['size']:9s} decode {row['decode_ms']:6.1f} ms  "
                  + "  ".join(f"{k} {v:.1f}" for k, v in cats.items()), flush=True)
        del vae
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def bench_profile(dtype, impls, kind="ternary"):
    """GPU time of one transformer step by kernel category (torch.profiler), eager."""
    from torch.profiler import ProfilerActivity, profile

    from bonsai import latents
    from bonsai.backends.cuda.choice import GemmChoices
    from bonsai.backends.cuda.linear import Workspace
    from bonsai.backends.torch.transformer import load_transformer
    from bonsai.config import KLEIN_4B

    tensors = random_model_tensors(KLEIN_4B, kind)
    ws = Workspace("cuda")
    makers = linear_makers(dtype, ws, GemmChoices())
    rows = []
    for impl in impls:
        model = load_transformer(tensors, KLEIN_4B, device="cuda", dtype=dtype, make_linear=makers[impl],
                                 ops=impl_ops(impl))
        for hgt, wid in SIZES.values():
            h, w = latents.latent_size(hgt, wid)
            args = (torch.randn(1, h * w, 128, device="cuda", dtype=dtype),
                    torch.randn(1, TEXT_TOKENS, 7680, device="cuda", dtype=dtype),
                    torch.full((1,), 0.5, device="cuda", dtype=dtype),
                    latents.img_ids(h, w).cuda(), latents.txt_ids(TEXT_TOKENS).cuda())
            with torch.inference_mode():
                model(*args)
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    model(*args)
                    torch.cuda.synchronize()
            cats, other = profile_categories(prof, kernel_category)
            row = dict(kind=kind, impl=impl, size=f"{hgt}x{wid}", gpu_ms=sum(cats.values()), **cats,
                       top_other=other)
            rows.append(row)
            print("profile", row, flush=True)
        del model
        ws.release()
    del tensors
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def versions():
    import triton

    out = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
               gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    try:
        import gemlite

        out["gemlite"] = getattr(gemlite, "__version__", "installed")
    except ImportError:
        out["gemlite"] = None
    return out


def markdown(result) -> str:
    v = result["versions"]
    lines = [f"Command: `{result['command']}`  ", f"Date: {result['date']}; {v['gpu']}; torch {v['torch']} (CUDA "
             f"{v['cuda']}), triton {v['triton']}, gemlite {v['gemlite']}, python {v['python']}; activations "
             f"{result['dtype']}.", ""]
    if result.get("linears"):
        lines += ["Per linear, TFLOP/s (median of triton.testing.do_bench). expand+cuBLAS: Triton expand to a bf16 "
                  "scratch, then cuBLAS; fused: our Triton GEMM unpacking in the K loop (best config); auto: what "
                  "`linear=\"auto\"` measured and picked; fp8: e4m3 activations per token and 128-group (best of our "
                  "fp8 GEMMs, quantization included), its rel. error against the bf16 dense output; gemlite: released "
                  "layout, 8-bit packing.", "",
                  "| kind | linear (K->N) | M | dense bf16 | expand+cuBLAS | fused | auto (pick) | auto/dense | fp8 "
                  "| fp8 err | gemlite |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in result["linears"]:
            g = f"{r['gemlite_tflops']:.0f}" if r["gemlite_tflops"] else "-"
            pick = r["auto_choice"].split("/")[0] if r["auto_choice"] else "-"
            lines.append(f"| {r['kind']} | {r['linear']} {r['K']}->{r['N']} | {r['M']} | {r['dense_tflops']:.0f} | "
                         f"{r['expand_cublas_tflops']:.0f} | {r['fused_tflops']:.0f} | {r['auto_tflops']:.0f} ({pick}) | "
                         f"{r['auto_tflops'] / r['dense_tflops']:.2f} | {r['fp8_tflops']:.0f} | {r['fp8_rel_err']:.1e} | "
                         f"{g} |")
    if result.get("projections"):
        lines += ["", "Linears that read one input, us per call replayed from a CUDA graph: dense cuBLAS on resident "
                  "bf16 weights one by one, our layers one by one, and together as one GEMM over the weights "
                  "expanded side by side (what the models run); rel diff: together against one by one.", "",
                  "| linears | activations | M | dense bf16 | one by one | together | rel diff |", "|---" * 7 + "|"]
        for r in result["projections"]:
            lines.append(f"| {r['group']} | {r['activations']} | {r['M']} | {r['dense_ms'] * 1e3:.1f} | "
                         f"{r['apart_ms'] * 1e3:.1f} | **{r['together_ms'] * 1e3:.1f}** | {r['rel_diff']:.1e} |")
    if result.get("steps"):
        lines += ["", "Full 4B transformer step (5 double + 20 single blocks, 512 text tokens, random weights):", "",
                  "| kind | linears | size | step eager (median of 7) | step CUDA graph | first step | weights VRAM | "
                  "steady VRAM | peak VRAM | output rel. error vs the first row |", "|---" * 10 + "|"]
        for r in result["steps"]:
            err = f"{r['rel_err_vs_first']:.1e}" if "rel_err_vs_first" in r else "-"
            lines.append(f"| {r['kind']} | {r['impl']} | {r['size']} | {r['step_ms']:.1f} ms | {r['graph_step_ms']:.1f} ms "
                         f"| {r['first_step_s']:.2f} s "
                         f"| {r['weights_gb']:.2f} GB | {r['steady_gb']:.2f} GB | {r['peak_gb']:.2f} GB | {err} |")
    if result.get("profile"):
        cats = sorted({k for r in result["profile"] for k in r} - {"kind", "impl", "size", "gpu_ms", "top_other"})
        lines += ["", "GPU time of one eager step by kernel category (torch.profiler, ms):", "",
                  "| kind | linears | size | GPU total | " + " | ".join(cats) + " |", "|---" * (4 + len(cats)) + "|"]
        for r in result["profile"]:
            lines.append(f"| {r['kind']} | {r['impl']} | {r['size']} | {r['gpu_ms']:.1f} | "
                         + " | ".join(f"{r.get(c, 0.0):.1f}" for c in cats) + " |")
        lines += top_kernels(result["profile"], ("impl", "size"))
    if result.get("vae"):
        cats = sorted({k for r in result["vae"] for k in r}
                      - {"norm", "layout", "size", "first_s", "decode_ms", "peak_gb", "gpu_ms", "top_other"})
        lines += ["", "VAE decoder (full size, random weights), median of 5, and its GPU time by kernel category "
                  "(torch.profiler, ms):", "",
                  "| VAE ops | layout | size | decode | peak VRAM | GPU total | " + " | ".join(cats) + " |",
                  "|---" * (6 + len(cats)) + "|"]
        for r in result["vae"]:
            lines.append(f"| {r['norm']} | {r['layout']} | {r['size']} | {r['decode_ms']:.1f} ms | {r['peak_gb']:.2f} GB "
                         f"| {r['gpu_ms']:.1f} | " + " | ".join(f"{r.get(c, 0.0):.1f}" for c in cats) + " |")
        lines += top_kernels(result["vae"], ("norm", "layout", "size"))
    return "\n".join(lines) + "\n"


def top_kernels(rows, keys) -> list[str]:
    lines = ["", "Largest kernels of the last category (ms, calls):", ""]
    for r in rows:
        lines.append(f"- {' '.join(r[k] for k in keys)}: "
                     + "; ".join(f"`{name[:60]}` {ms:.2f} ({n})" for name, ms, n in r.get("top_other", [])))
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/h100", help="output prefix (writes .json and .md)")
    p.add_argument("--sections", default="linear,step", help="comma list of linear | projections | step | profile | vae")
    p.add_argument("--linear-kinds", default="ternary")
    p.add_argument("--step-kinds", default="ternary,binary")
    p.add_argument("--impls", default="ours,ours_fp8,gemlite,dense_bf16",
                   help="ours (linear=auto), ours_expand, ours_fused, ours_fp8, ours_torchops (elementwise=torch), "
                        "gemlite, dense_bf16")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_cuda.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    impls = args.impls.split(",")
    result = dict(command="python benchmarks/bench_cuda.py " + " ".join(argv or __import__("sys").argv[1:]),
                  versions=versions(), dtype=args.dtype, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.with_suffix(".json").write_text(json.dumps(result, indent=1))
        out.with_suffix(".md").write_text(markdown(result))

    sections = args.sections.split(",")
    tune_file = None
    if "gemlite" in impls:
        from bonsai.backends.cuda import gemlite as glb

        tune_file = glb.autotune_cache_path()
        glb.load_autotune(tune_file)
    if "linear" in sections:
        result["linears"] = bench_linears(dtype, "gemlite" in impls, args.linear_kinds.split(","))
        save()
    if "projections" in sections:
        result["projections"] = bench_projections(dtype, args.linear_kinds.split(","))
        save()
    if "step" in sections:
        result["steps"] = bench_steps(dtype, impls, args.step_kinds.split(","))
        save()
    if "profile" in sections:
        try:
            result["profile"] = bench_profile(dtype, [i for i in impls if i != "gemlite"])
        except Exception as e:  # a profiler quirk must not cost the other sections
            print(f"profile section failed: {type(e).__name__}: {e}", flush=True)
        save()
    if "vae" in sections:
        result["vae"] = bench_vae(dtype)
        save()
    if tune_file is not None:
        glb.save_autotune(tune_file)
    print(markdown(result))


if __name__ == "__main__":
    main()
