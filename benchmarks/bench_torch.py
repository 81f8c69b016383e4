"""Time the torch reference backend: a whole 4-step render of a tiny repo, and the denoise loop of the tiny and
the real-width transformer with random low-bit weights.

    python benchmarks/bench_torch.py --configs tiny,klein-4b --size 128 --steps 4 --out benchmarks/results/torch-cpu.json

Weights are random packed ternary/binary codes (`bonsai.testing`), held packed as the backend holds them (a dense
fp32 copy of the real-width model would be 15 GB), so this measures speed and memory only. Text features for the
transformer rows are random [1, 512, joint].
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time

import torch

import bonsai
from bonsai import latents, sampling, testing
from bonsai.backends.torch.transformer import load_transformer
from bonsai.config import KLEIN_4B

CONFIGS = {"tiny": testing.TINY_TRANSFORMER, "klein-4b": KLEIN_4B}
SIGMAS_512 = [1.0, 0.9580854, 0.8839819, 0.7174966, 0.0]  # klein's 4-step schedule at 512x512 (spec §4.2)


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def denoise(model, x, features, sigmas, img_ids, txt_ids):
    """The shared sampler over the transformer, as the torch runtime runs it."""
    rope = model.rope(img_ids, txt_ids, x.device)

    def velocity(x, t):
        return model(x, features, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype), rope=rope)

    for _, x in sampling.sample(velocity, x, sigmas, x.dtype):
        pass
    return x


def bench(name: str, size: int, steps: int, kind: str, device: torch.device, dtype: torch.dtype, txt_len: int):
    cfg = CONFIGS[name]
    t0 = time.perf_counter()
    model = load_transformer(testing.random_transformer(cfg, kind), cfg, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    h = w = size // 16
    x = latents.pack(latents.noise(0, size, size, channels=cfg.in_channels)).to(device, dtype)
    features = torch.randn(1, txt_len, cfg.joint_attention_dim).to(device, dtype)
    img_ids, txt_ids = latents.img_ids(h, w).to(device), latents.txt_ids(txt_len).to(device)
    sigmas = SIGMAS_512[:steps] + [0.0]
    denoise(model, x, features, [1.0, 0.0], img_ids, txt_ids)  # warm-up: one step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    t0 = time.perf_counter()
    out = denoise(model, x, features, sigmas, img_ids, txt_ids)
    sync(device)
    total = time.perf_counter() - t0
    if not torch.isfinite(out.float()).all():
        raise RuntimeError(f"{name}: non-finite output")
    return {
        "config": name, "size": size, "steps": steps, "kind": kind, "device": str(device), "dtype": str(dtype),
        "txt_len": txt_len, "tokens": h * w + txt_len, "load_s": round(load_s, 3), "total_s": round(total, 4),
        "s_per_step": round(total / steps, 4),
        "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 3) if device.type == "cuda" else None,
        "params": sum(p.numel() for p in model.parameters()),
        "packed_mb": round(sum(b.numel() * b.element_size() for b in model.buffers()) / 1e6, 1),
    }


def bench_render(size: int, kind: str, device: torch.device, dtype: torch.dtype) -> dict:
    """A whole render (encode + 4 steps + decode) of a tiny synthetic gemlite repo through bonsai.Pipeline."""
    with tempfile.TemporaryDirectory() as tmp:
        repo = testing.write_repo(f"{tmp}/repo", layout="gemlite", kind=kind)
        pipe = bonsai.Pipeline.from_pretrained(repo, backend="torch", device=device, dtype=dtype)
        pipe("warm-up", width=size, height=size, seed=0, progress=False)
        report = pipe("a bonsai tree", width=size, height=size, seed=1, progress=False).report
    return {"size": size, "kind": kind, "encode_s": round(report.encode_s, 4), "denoise_s": round(report.denoise_s, 4),
            "decode_s": round(report.decode_s, 4), "total_s": round(report.total_s, 4), "report": str(report)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="tiny,klein-4b", help=f"comma list of {sorted(CONFIGS)}")
    ap.add_argument("--size", type=int, default=256, help="square image size in pixels (multiple of 16)")
    ap.add_argument("--steps", type=int, default=4, choices=range(1, 5))
    ap.add_argument("--kind", default="ternary", choices=["ternary", "binary"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--txt-len", type=int, default=512, help="text tokens (the pipeline always pads to 512)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}")
    render = bench_render(args.size, args.kind, device, dtype)
    print(f"tiny repo, whole render ({args.size}x{args.size}, 4 steps): {render['report']}")
    rows = [bench(n, args.size, args.steps, args.kind, device, dtype, args.txt_len) for n in names]

    cols = ["config", "size", "steps", "kind", "device", "dtype", "tokens", "s_per_step", "total_s", "peak_gb"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(str(r[c]) for c in cols))
    if args.out:
        meta = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "render": render, "results": rows}, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
