"""Study: the transformer's attention (24 heads of 128, text + image tokens) on each kernel this GPU image can run.

torch SDPA's cuDNN backend (what the CUDA backend runs), its FlashAttention-2 and memory-efficient backends, and
SageAttention 1.0.6 (INT8 Q·K^T with per-block scales, fp16 P·V; pure Triton, carried as a wheel) as the 8-bit
attention. FlashAttention-3 has no wheel on PyPI (it builds from source against the CUDA toolkit), so it is not
here. Each row's error is against the same attention in float64 on the same bf16 inputs: max |out - ref| /
max |ref| and mean |out - ref| / mean |ref|. "sharp" scales q by 4, the peaked attention where 8-bit scores lose
the most.

    python benchmarks/attention_study.py --out /tmp/out/h200-attention
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, new_result, write_results  # noqa: E402
from expand_study import graph_ms  # noqa: E402

HEADS, DIM = 24, 128
BACKENDS = dict(cudnn=SDPBackend.CUDNN_ATTENTION, flash2=SDPBackend.FLASH_ATTENTION,
                efficient=SDPBackend.EFFICIENT_ATTENTION)


def kernels():
    """name -> attention(q, k, v) for [B, H, N, d] bf16 inputs."""
    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    out = {name: sdpa(b) for name, b in BACKENDS.items()}
    try:
        from sageattention import sageattn
    except ImportError as e:
        print(f"sageattention not importable ({e}): its rows are left out", flush=True)
    else:
        out["sage_int8"] = lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", default="1536,4608", help="text + image tokens (512 + 32², 512 + 64²)")
    args = ap.parse_args(argv)
    result = new_result(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    table = []
    for n in (int(v) for v in args.tokens.split(",")):
        for case, q_scale in (("unit", 1.0), ("sharp", 4.0)):
            q, k, v = (torch.randn(1, HEADS, n, DIM, generator=gen, device="cuda").to(torch.bfloat16)
                       for _ in range(3))
            q = (q.float() * q_scale).to(torch.bfloat16)
            ref = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * DIM**-0.5, dim=-1) @ v.double()
            flops = 4 * n * n * DIM * HEADS
            row = dict(tokens=n, case=case)
            for name, fn in kernels().items():
                try:
                    o = fn(q, k, v)
                    ms = graph_ms(lambda: fn(q, k, v), reps=10)
                except RuntimeError as e:  # a backend that refuses these shapes says why in the row
                    row[name] = dict(error=str(e).splitlines()[0][:120])
                    continue
                err = (o.double() - ref).abs()
                row[name] = dict(ms=ms, tflops=flops / ms / 1e9, max_err=(err.max() / ref.abs().max()).item(),
                                 mean_err=(err.mean() / ref.abs().mean()).item())
            table.append(row)
            print(row, flush=True)
            del ref
    result.update(rows=table)
    names = list(kernels())
    md = ["# Transformer attention study", "", *header(result),
          f"ms per call, {HEADS} heads of {DIM}, batch 1 (CUDA graph replays), TFLOP/s, and the error against "
          "float64 (max / mean, relative)", "",
          "| tokens | q | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for r in table:
        cells = []
        for name in names:
            c = r.get(name, {})
            cells.append(c["error"] if "error" in c else
                         f"{c['ms']:.3f} ms, {c['tflops']:.0f} TF/s, {c['max_err']:.1e} / {c['mean_err']:.1e}")
        md.append(f"| {r['tokens']} | {r['case']} | " + " | ".join(cells) + " |")
    write_results(args.out, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
