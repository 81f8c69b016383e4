"""Study: the expand + cuBLAS linear's expand pass (2.8 ms of a 1024x1024 step), three ways, on the FLUX shapes.

- `serial`: what `linear="expand"` does now: the whole [N, K] bf16 weight expanded to HBM, then cuBLAS.
- `chunked/<MB>`: rows expanded in chunks of about <MB> into one small buffer that stays in L2, each chunk's
  GEMM written straight into its output columns (cuBLAS takes the [M, N] output's column slice, ld = N).
- `prefetch`: the next layer's expand on a second stream while this layer's GEMM (and the attention between)
  runs, into the other of two buffers.
Everything is captured in CUDA graphs (as the runtime replays the step) and timed by replays; `dense` is cuBLAS
on a resident bf16 weight ([N, K] as F.linear reads it, and stored transposed [K, N]). The chain rows run 20
single blocks' [linear1, attention, linear2].

`--sweep` instead times the expand kernel alone over its (BLOCK_N, BLOCK_K, num_warps) on every shape it expands
(the transformer's binary and ternary linears, the text encoder's 4-bit g64 ones), in TB/s of bytes moved, beside
a bf16 fill and copy of the weight's size (what HBM allows).

    python benchmarks/expand_study.py --out /tmp/out/h200-expand-study
    python benchmarks/expand_study.py --sweep --out /tmp/out/h200-expand-sweep
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cuda import FLUX_SHAPES, random_lowbit, tflops  # noqa: E402
from common import header, new_result, write_results  # noqa: E402

from bonsai.backends.cuda.kernels import expand_lowbit  # noqa: E402

HEADS, HEAD_DIM = 24, 128
TEXT_SHAPES = [("te q", 2560, 4096), ("te k/v", 2560, 1024), ("te o", 4096, 2560), ("te gate/up", 2560, 9728),
               ("te down", 9728, 2560)]  # Qwen3-4B (name, in, out)
SWEEP = [(n, k, w) for n in (16, 32, 64) for k in (256, 512, 1024) for w in (4, 8) if 8 <= n * k // (32 * w) <= 128]


def graph_ms(fn, reps=20, rounds=5) -> float:
    """Median ms of one fn() replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def expand(w, out):
    return expand_lowbit(w.packed, w.scales, w.bits, 128, w.shape[1], out)


def serial(x, w, buf):
    n, k = w.shape
    return F.linear(x, expand(w, buf[: n * k].view(n, k)))


def chunked(x, w, buf, rows, out):
    """out [M, N] = x @ W.T, W expanded `rows` output rows at a time into buf (L2-resident)."""
    n, k = w.shape
    for n0 in range(0, n, rows):
        n1 = min(n, n0 + rows)
        wc = buf[: (n1 - n0) * k].view(n1 - n0, k)  # [rows, K]
        expand_lowbit(w.packed[n0:n1], w.scales[n0:n1], w.bits, 128, k, wc)
        torch.mm(x, wc.t(), out=out[:, n0:n1])
    return out


def chunk_rows(k: int, mb: int) -> int:
    return max(128, (mb << 20) // (2 * k) // 128 * 128)


def attention(h, m):
    q = h[:, : HEADS * HEAD_DIM].reshape(1, m, HEADS, HEAD_DIM).transpose(1, 2)  # [1, H, M, d]
    return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(m, HEADS * HEAD_DIM)


def chain(mode, x, layers, bufs, outs, denses, mb=16):
    """20 single blocks: h = lin1(x); a = attention(h); y = lin2([a | h[:, 3072*3:]]) (shapes as klein's)."""
    m = x.shape[0]
    main = torch.cuda.current_stream()
    flat = [w for pair in layers for w in pair]
    if mode == "prefetch":
        side, ready, done = bufs[2], [torch.cuda.Event() for _ in flat], [torch.cuda.Event() for _ in flat]
        n, k = flat[0].shape
        expand(flat[0], bufs[0][: n * k].view(n, k))
        ready[0].record(main)
    i = 0
    for w1, w2 in layers:
        hs = []
        for w, out in ((w1, outs[0]), (w2, outs[1])):
            inp = x if w is w1 else torch.cat([attention(hs[0], m), hs[0][:, 3 * 3072:3 * 3072 + 9216]], dim=1)
            n, k = w.shape
            if mode == "dense":
                y = F.linear(inp, denses[id(w)])
            elif mode == "serial":
                y = serial(inp, w, bufs[0])
            elif mode == "chunked":
                y = chunked(inp, w, bufs[0], chunk_rows(k, mb), out)
            else:
                main.wait_event(ready[i])
                if i + 1 < len(flat):
                    side.wait_stream(main) if i == 0 else side.wait_event(done[i - 1])
                    with torch.cuda.stream(side):
                        nn_, kn = flat[i + 1].shape
                        expand(flat[i + 1], bufs[(i + 1) % 2][: nn_ * kn].view(nn_, kn))
                        ready[i + 1].record(side)
                y = F.linear(inp, bufs[i % 2][: n * k].view(n, k))
                done[i].record(main)
            hs.append(y)
            i += 1
        x = hs[1]
    if mode == "prefetch":
        main.wait_stream(side)
    return x


def sweep(result, gen) -> list[str]:
    """Rows of the expand kernel's configs per shape; returns the markdown."""
    rows = []
    for kind in ("ternary", "binary", "int4"):
        for name, k, n in FLUX_SHAPES if kind != "int4" else TEXT_SHAPES:
            if kind == "int4":
                bits, group = 4, 64
                packed = torch.randint(0, 256, (n, k // 2), generator=gen, device="cuda", dtype=torch.uint8)
                scales, zeros = (torch.rand(n, k // group, generator=gen, device="cuda").to(torch.bfloat16)
                                 for _ in range(2))
            else:
                w = random_lowbit(n, k, kind, gen)
                bits, group, packed, scales, zeros = w.bits, 128, w.packed, w.scales, None
            out = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
            moved = out.nbytes + packed.nbytes + scales.nbytes + (zeros.nbytes if zeros is not None else 0)
            ref = expand_lowbit(packed, scales, bits, group, k, torch.empty_like(out), zeros=zeros)
            other = torch.empty_like(out)
            row = dict(kind=kind, linear=name, K=k, N=n, bytes=moved,
                       fill_ms=graph_ms(lambda: out.fill_(1.0)), copy_ms=graph_ms(lambda: out.copy_(other)))
            for cfg in SWEEP:
                if k % cfg[1] or cfg[1] % group:
                    continue
                out.zero_()
                expand_lowbit(packed, scales, bits, group, k, out, zeros=zeros, config=cfg)
                if not torch.equal(out, ref):
                    raise AssertionError(f"{kind} {name}: config {cfg} expands other values than the default")
                row["x".join(map(str, cfg))] = graph_ms(
                    lambda: expand_lowbit(packed, scales, bits, group, k, out, zeros=zeros, config=cfg))
            row["default_ms"] = graph_ms(lambda: expand_lowbit(packed, scales, bits, group, k, out, zeros=zeros))
            rows.append(row)
            print({key: round(v, 4) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
    result.update(sweep=rows, configs=["x".join(map(str, c)) for c in SWEEP])
    tbs = lambda r, key: f"{r['bytes'] / r[key] / 1e9:.2f}"  # noqa: E731  bytes / ms -> TB/s
    md = ["Expand kernel alone, TB/s of bytes moved (bf16 weight written, codes, scales and zeros read); best config "
          "in bold. fill: a bf16 fill of the weight; copy: a bf16 copy (its bytes counted once, as written).", "",
          "| kind | linear | fill | copy | default | best config | best |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cfgs = [c for c in result["configs"] if c in r]
        best = min(cfgs, key=lambda c: r[c])
        weight = r["N"] * r["K"] * 2
        md.append(f"| {r['kind']} | {r['linear']} {r['K']}→{r['N']} | {weight / r['fill_ms'] / 1e9:.2f} | "
                  f"{weight / r['copy_ms'] / 1e9:.2f} | {tbs(r, 'default_ms')} | {best} | **{tbs(r, best)}** |")
    configs = result["configs"]
    md += ["", "Per config (BLOCK_N x BLOCK_K x warps), TB/s:", "",
           "| kind | linear | " + " | ".join(configs) + " |", "|---|---|" + "---|" * len(configs)]
    for r in rows:
        md.append(f"| {r['kind']} | {r['linear']} | " + " | ".join(tbs(r, c) if c in r else "" for c in configs) + " |")
    return md


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="1536,4608")
    ap.add_argument("--chunks-mb", default="8,16,32")
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--sweep", action="store_true", help="only the expand kernel's configs")
    args = ap.parse_args(argv)
    result = new_result(argv)
    gen = torch.Generator("cuda").manual_seed(0)
    if args.sweep:
        md = ["# expand kernel sweep", "", *header(result), *sweep(result, gen)]
        write_results(args.out, result, "\n".join(md) + "\n")
        return
    ms, chunks = [int(v) for v in args.ms.split(",")], [int(v) for v in args.chunks_mb.split(",")]
    buf = torch.empty(27648 * 3072, device="cuda", dtype=torch.bfloat16)
    rows = []
    for name, k, n in FLUX_SHAPES:
        w = random_lowbit(n, k, "ternary", gen)
        dense = expand(w, torch.empty(n, k, device="cuda", dtype=torch.bfloat16))
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, dense)
            # cuBLAS may pick another kernel (split-K) for a chunk's N: then the chunks' bits differ from dense
            exact = all(torch.equal(chunked(x, w, buf, chunk_rows(k, mb), out), ref) for mb in chunks)
            dense_t = dense.t().contiguous()  # [K, N]: cuBLAS's NN GEMM instead of TN picks other kernels
            row = dict(chunked_exact=exact, linear=name, K=k, N=n, M=m, dense_ms=graph_ms(lambda: F.linear(x, dense)),
                       dense_nn_ms=graph_ms(lambda: torch.mm(x, dense_t)),
                       expand_ms=graph_ms(lambda: expand(w, buf[: n * k].view(n, k))),
                       serial_ms=graph_ms(lambda: serial(x, w, buf)))
            for mb in chunks:
                row[f"chunked{mb}_ms"] = graph_ms(lambda: chunked(x, w, buf, chunk_rows(k, mb), out))
            del dense_t
            rows.append(row)
            print({key: round(v, 3) if isinstance(v, float) else v for key, v in row.items()}, flush=True)
        del dense
    # chain of single blocks: linear1 3072 -> 27648 (q, k, v, 2 x 9216 MLP), linear2 12288 -> 3072
    layers, denses = [], {}
    for _ in range(args.blocks):
        pair = []
        for k, n in ((3072, 27648), (12288, 3072)):
            w = random_lowbit(n, k, "ternary", gen)
            pair.append(w)
            denses[id(w)] = expand(w, torch.empty(n, k, device="cuda", dtype=torch.bfloat16))
        layers.append(pair)
    bufs = [buf, torch.empty_like(buf), torch.cuda.Stream()]
    chains = []
    for m in ms:
        x = torch.randn(m, 3072, device="cuda", dtype=torch.bfloat16)
        outs = [torch.empty(m, 27648, device="cuda", dtype=torch.bfloat16),
                torch.empty(m, 3072, device="cuda", dtype=torch.bfloat16)]
        ref = chain("dense", x, layers, bufs, outs, denses)
        row = dict(M=m, blocks=args.blocks)
        for mode in ("dense", "serial", "chunked", "prefetch"):
            got = chain(mode, x, layers, bufs, outs, denses)
            torch.cuda.synchronize()
            row[f"{mode}_exact"] = bool(torch.equal(got, ref))
            row[f"{mode}_ms"] = graph_ms(lambda: chain(mode, x, layers, bufs, outs, denses), reps=5)
        chains.append(row)
        print(row, flush=True)
    result.update(linears=rows, chains=chains)
    md = ["# expand study", "", *header(result),
          "| linear | M | dense | dense, W stored [K, N] | expand alone | serial | "
          + " | ".join(f"chunked {c} MB" for c in chunks) + " |", "|---|---|---|---|---|---|" + "---|" * len(chunks)]
    for r in rows:
        md.append(f"| {r['linear']} {r['K']}→{r['N']} | {r['M']} | {r['dense_ms']:.3f} "
                  f"({tflops(r['M'], r['K'], r['N'], r['dense_ms']):.0f} TF/s) | {r['dense_nn_ms']:.3f} | "
                  f"{r['expand_ms']:.3f} | {r['serial_ms']:.3f} | " + " | ".join(f"{r[f'chunked{c}_ms']:.3f}" for c in chunks) + " |")
    md += ["", f"{args.blocks} single blocks [linear1, attention, linear2], ms per chain (exact = bit-equal to dense):",
           "", "| M | dense | serial | chunked 16 MB | prefetch |", "|---|---|---|---|---|"]
    for r in chains:
        md.append(f"| {r['M']} | " + " | ".join(f"{r[f'{m}_ms']:.2f}{'' if r[f'{m}_exact'] else ' (differs)'}"
                                               for m in ("dense", "serial", "chunked", "prefetch")) + " |")
    write_results(args.out, result, "\n".join(md) + "\n")


if __name__ == "__main__":
    main()
