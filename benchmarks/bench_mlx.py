"""MLX backend benchmark: s/step and s/image for ternary, binary and the same model dense (dequantized).

    python benchmarks/bench_mlx.py --sizes 512 1024 --out results/mlx-metal.json           # klein-4B shapes
    python benchmarks/bench_mlx.py --small --sizes 128 256 --out benchmarks/results/mlx-cpu.json --md ...

Weights are synthetic (random codes/scales in the released MLX encodings) unless --model points at a repo, so
the timings are those of the real shapes without a download. s/image = denoise (--steps) + VAE decode; the
prompt encoding runs once per prompt and is not included. Memory is the runtime's proxy: mx.get_active_memory()
sampled every 50 ms during each stage (mean active GB and GB*s).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bonsai import latents as L  # noqa: E402
from bonsai import sampling  # noqa: E402
from bonsai.backends.torch.runtime import LazyModel  # noqa: E402
from bonsai.backends.mlx.runtime import MLXRuntime, dtype_name  # noqa: E402
from bonsai.backends.mlx.transformer import Flux2Transformer, linear_shapes, load_transformer  # noqa: E402
from bonsai.backends.mlx.vae import load_vae_decoder  # noqa: E402
from bonsai.config import TextEncoderConfig, TransformerConfig, VAEConfig  # noqa: E402

# CPU-sized stand-in: klein's head size and block structure, a third of its width, fewer blocks.
SMALL = TransformerConfig(num_layers=2, num_single_layers=4, num_attention_heads=8)
SMALL_VAE = VAEConfig(block_out_channels=(32, 64, 128, 128))
TEXT_TOKENS = 512


def synthetic_tensors(config: TransformerConfig, kind: str, seed: int = 0) -> dict[str, mx.array]:
    """Random weights in the released MLX layout: block linears low-bit (g128), everything else bf16."""
    mx.random.seed(seed)
    bits = 2 if kind == "ternary" else 1
    tensors = {}
    for prefix, (out_f, in_f) in linear_shapes(Flux2Transformer(config)).items():
        if prefix.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            per = 32 // bits
            q = mx.random.randint(0, 3 if kind == "ternary" else 2, (out_f, in_f // per, per)).astype(mx.uint32)
            w = (q << (mx.arange(per, dtype=mx.uint32) * bits)).sum(axis=-1).astype(mx.uint32)  # disjoint bits
            s = (mx.random.uniform(0.5, 1.5, (out_f, in_f // 128)) / np.sqrt(in_f)).astype(mx.bfloat16)
            scales, biases = (s, -s) if kind == "ternary" else (2 * s, -s)
            tensors.update({f"{prefix}.weight": w, f"{prefix}.scales": scales, f"{prefix}.biases": biases})
        else:
            tensors[f"{prefix}.weight"] = (mx.random.normal((out_f, in_f)) / np.sqrt(in_f)).astype(mx.bfloat16)
    heads = config.attention_head_dim
    for i in range(config.num_layers):
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            tensors[f"transformer_blocks.{i}.attn.{n}.weight"] = mx.ones((heads,), mx.bfloat16)
    for i in range(config.num_single_layers):
        for n in ("norm_q", "norm_k"):
            tensors[f"single_transformer_blocks.{i}.attn.{n}.weight"] = mx.ones((heads,), mx.bfloat16)
    mx.eval(tensors)
    return tensors


def synthetic_vae(config: VAEConfig, dtype: str):
    from bonsai.backends.mlx.vae import VAEDecoder
    from mlx.utils import tree_flatten

    mx.random.seed(1)
    state = {}
    for k, v in tree_flatten(VAEDecoder(config).parameters()):
        a = mx.random.normal(v.shape) * 0.02
        state[k] = a.transpose(0, 3, 1, 2) if a.ndim == 4 else a  # store as torch layout, like the file
    state["bn.running_mean"] = mx.zeros((4 * config.latent_channels,))
    state["bn.running_var"] = mx.ones((4 * config.latent_channels,))
    return load_vae_decoder(state, config, dtype=dtype)


def build_runtime(args, kind: str) -> MLXRuntime:
    dtype = dtype_name(args.dtype)
    if args.model:
        return MLXRuntime.load(args.model, dtype=dtype, dense=kind == "dense")
    config = SMALL if args.small else TransformerConfig()
    tensors = synthetic_tensors(config, "ternary" if kind == "dense" else kind)
    bits = 1 if kind == "binary" else 2
    transformer = load_transformer(tensors, config, bits, dtype=dtype, dense=kind == "dense")
    vae = synthetic_vae(SMALL_VAE if args.small else VAEConfig(), dtype)
    unused = LazyModel(lambda: None, keep=False)  # rows time the transformer and the decoder only
    return MLXRuntime(transformer, kind, vae, unused, TextEncoderConfig(), dtype, None, unused)


def weight_bytes(rt: MLXRuntime) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(rt.transformer.parameters()))


def bench_size(rt: MLXRuntime, size: int, steps: int, repeat: int) -> dict:
    h, w = L.latent_size(size, size)
    joint = rt.transformer.config.joint_attention_dim
    features = mx.random.normal((1, TEXT_TOKENS, joint)).astype(rt.mx_dtype)
    img_ids, txt_ids = L.img_ids(h, w), L.txt_ids(TEXT_TOKENS)
    sigmas = [float(s) for s in np.linspace(1.0, 0.25, steps)] + [0.0]
    noise = L.pack(L.noise(0, size, size))
    cond = rt.condition([features], img_ids, txt_ids)

    def denoise(sigmas):
        x = rt.latents(noise)
        for _, x in sampling.sample(lambda x, t: rt.velocity(x, t, cond), x, sigmas, rt.dtype):
            pass
        return x

    denoise(sigmas[-2:])  # warm-up: one step
    best = None
    for _ in range(repeat):
        rt.reset_peak_memory()
        t0 = time.perf_counter()
        x = denoise(sigmas)
        t1 = time.perf_counter()
        rt.decode(x, size, size)
        t2 = time.perf_counter()
        mem = rt.memory_report()
        run = {"s_per_step": (t1 - t0) / steps, "denoise_s": t1 - t0, "decode_s": t2 - t1, "s_per_image": t2 - t0,
               "denoise_mean_active_gb": mem["stages"]["denoise"]["mean_active_gb"],
               "denoise_gb_s": mem["stages"]["denoise"]["gb_s"], "mean_active_gb": mem["mean_active_gb"],
               "gb_s": mem["gb_s"], "peak_gb": mem["peak_gb"]}
        best = run if best is None or run["s_per_image"] < best["s_per_image"] else best
    return best


def markdown(result: dict) -> str:
    """The same tables as benchmarks/bench_cuda.py writes, plus the MLX memory proxy."""
    lines = [f"Command: `{result['command']}`  ",
             f"Date: {result['date']}; {result['versions']['device']} ({result['versions']['machine']}); "
             f"mlx {result['versions']['mlx']}, python {result['versions']['python']}; activations {result['dtype']}.",
             f"Model: {result['model']}", "",
             "Transformer step (random weights; dense = the same ternary model dequantized):", "",
             "| kind | linears | size | step | weights | denoise mean active (50 ms samples) | peak |",
             "|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        lines.append(f"| {r['kind']} | {r['impl']} | {r['size']} | {r['step_ms']:.1f} ms | {r['weights_gb']:.3f} GB "
                     f"| {r['denoise_mean_active_gb']:.3f} GB | {r['peak_gb']:.3f} GB |")
    lines += ["", f"Image ({result['steps_per_image']} steps + VAE decode; prompt encoding not included):", "",
              "| kind | linears | mode | size | total | encode | denoise | decode | mean active | GB*s | peak |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["e2e"]:
        lines.append(f"| {r['kind']} | {r['impl']} | {r['mode']} | {r['size']} | {1000 * r['total_s']:.0f} ms | - "
                     f"| {1000 * r['denoise_s']:.0f} ms | {1000 * r['decode_s']:.0f} ms | {r['mean_active_gb']:.3f} GB "
                     f"| {r['gb_s']:.2f} | {r['peak_gb']:.3f} GB |")
    if "CPU" in result["versions"]["device"]:
        lines += ["", "MLX-CPU numbers: only the ratios between rows mean anything; Metal speed needs a Mac."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="square image sizes in pixels")
    p.add_argument("--kinds", nargs="+", default=["ternary", "binary", "dense"], choices=["ternary", "binary", "dense"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32")
    p.add_argument("--small", action="store_true", help="CPU-sized config (width 1024, 2+4 blocks, small VAE)")
    p.add_argument("--model", help="a local repo folder instead of synthetic weights (dense = dequantized on load)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--md", help="write a markdown table here")
    args = p.parse_args(argv)

    dtype = dtype_name(args.dtype)
    device = "MLX-Metal" if mx.metal.is_available() else "MLX-CPU (not Metal)"
    result = {"command": "python " + " ".join(sys.argv),
              "versions": {"mlx": mx.__version__, "python": platform.python_version(), "device": device,
                           "machine": f"{platform.machine()} {platform.system()}"},
              "dtype": dtype, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "model": args.model or ("synthetic small: " + repr(SMALL) if args.small else "synthetic klein-4B shapes"),
              "steps_per_image": args.steps, "steps": [], "e2e": []}
    for kind in args.kinds:
        rt = build_runtime(args, kind)
        weights_gb = weight_bytes(rt) / 1e9
        # Rows keyed like bench_cuda.py: the dense model is the ternary one dequantized.
        row_kind, impl = ("ternary", f"dense_{dtype}") if kind == "dense" else (kind, "ours")
        for size in args.sizes:
            r = bench_size(rt, size, args.steps, args.repeat)
            common = {"kind": row_kind, "impl": impl, "size": f"{size}x{size}"}
            result["steps"].append({**common, "step_ms": 1000 * r["s_per_step"], "weights_gb": weights_gb,
                                    "denoise_mean_active_gb": r["denoise_mean_active_gb"],
                                    "denoise_gb_s": r["denoise_gb_s"], "peak_gb": r["peak_gb"]})
            result["e2e"].append({**common, "mode": "eager", "runs": args.repeat, "denoise_s": r["denoise_s"],
                                  "decode_s": r["decode_s"], "total_s": r["s_per_image"],
                                  "mean_active_gb": r["mean_active_gb"], "gb_s": r["gb_s"], "peak_gb": r["peak_gb"]})
            print(f"{size:5d} {kind:8s} weights {weights_gb:.3f} GB  {r['s_per_step']:.3f} s/step  "
                  f"{r['s_per_image']:.3f} s/image  denoise mean active {r['denoise_mean_active_gb']:.3f} GB", flush=True)
        del rt
        mx.clear_cache()
    table = markdown(result)
    print(table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(table)


if __name__ == "__main__":
    main()
