"""Study: the VAE mid-block's single-head attention (head dim 512; 16384 positions at 1024x1024), 4 ms of a decode.

FlashAttention and cuDNN stop at head dim 256, so `F.scaled_dot_product_attention` runs the mem-efficient
kernel. The alternative timed here is attention as cuBLAS GEMMs over query chunks: fp32 scores
(`torch.mm(out_dtype=float32)`), a fp32 softmax, bf16 probabilities times V: with torch's softmax and cast, and
as the CUDA backend runs it (`elementwise.attention`: one Triton pass from scores to probabilities). Each row's
error is against the same attention in float64 on the same bf16 inputs (max |err| / max |ref|).

    python benchmarks/vae_attention_study.py --out /tmp/out/h200-vae-attention
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, new_result, write_results  # noqa: E402
from expand_study import graph_ms  # noqa: E402

from bonsai.backends.cuda.elementwise import attention  # noqa: E402

C = 512


def chunked(q, k, v, rows: int, out):
    """out [L, C] = softmax(q k^T / sqrt(C)) v for q, k, v [L, C], `rows` queries at a time."""
    kt = k.t()
    for r0 in range(0, q.shape[0], rows):
        s = torch.mm(q[r0 : r0 + rows], kt, out_dtype=torch.float32)  # [rows, L] fp32 scores
        p = torch.softmax(s.mul_(C**-0.5), dim=-1).to(q.dtype)
        torch.mm(p, v, out=out[r0 : r0 + rows])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--lengths", default="4096,16384", help="positions (512x512, 1024x1024)")
    ap.add_argument("--rows", default="2048,4096,8192")
    args = ap.parse_args(argv)
    result = new_result(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    rows_list = [int(r) for r in args.rows.split(",")]
    table = []
    for length in (int(v) for v in args.lengths.split(",")):
        # GroupNorm'd activations through random projections: unit-scale q, k, v
        q, k, v = (torch.randn(length, C, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3))
        ref = torch.softmax((q.double() @ k.double().t()) * C**-0.5, dim=-1) @ v.double()

        def err(o):
            return ((o.double() - ref).abs().max() / ref.abs().max()).item()

        def sdpa():
            return F.scaled_dot_product_attention(q[None, None], k[None, None], v[None, None])[0, 0]

        def ours():
            return attention(q[None, None], k[None, None], v[None, None])[0, 0]

        row = dict(L=length, sdpa_ms=graph_ms(sdpa, reps=5), sdpa_err=err(sdpa()), ours_ms=graph_ms(ours, reps=5),
                   ours_err=err(ours()))
        out = torch.empty_like(q)
        for rows in rows_list:
            row[f"chunked{rows}_ms"] = graph_ms(lambda: chunked(q, k, v, rows, out), reps=5)
            row[f"chunked{rows}_err"] = err(chunked(q, k, v, rows, out))
            row[f"chunked{rows}_mb"] = rows * length * 6 / 2**20  # fp32 scores + bf16 probabilities
        table.append(row)
        print({key: round(val, 5) for key, val in row.items()}, flush=True)
        del ref
    result.update(rows=table)
    md = ["# VAE attention study", "", *header(result),
          "ms per attention (CUDA graph replays); err = max |out - float64| / max |float64|; scratch = the scores "
          "and probabilities of one chunk", "",
          "| positions | SDPA (mem-efficient) | ours (Triton softmax) | "
          + " | ".join(f"GEMMs + torch softmax, {r} rows" for r in rows_list) + " |",
          "|---|---|---|" + "---|" * len(rows_list)]
    for r in table:
        md.append(f"| {r['L']} | {r['sdpa_ms']:.3f} (err {r['sdpa_err']:.1e}) | {r['ours_ms']:.3f} "
                  f"(err {r['ours_err']:.1e}) | " + " | ".join(
            f"{r[f'chunked{n}_ms']:.3f} (err {r[f'chunked{n}_err']:.1e}, {r[f'chunked{n}_mb']:.0f} MB)"
            for n in rows_list) + " |")
    write_results(args.out, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
