"""CUDA cold start: time to first image in a fresh process, from a full-size synthetic repo on disk.

    python benchmarks/cold_start.py --repo /tmp/bonsai-repos --out benchmarks/results/h200-cold

Writes (once, `bonsai.testing.write_full_size_repo`) a repo in the released gemlite ternary layout with random
weights of the real shapes. Then times fresh processes that do what a user's script does (import bonsai,
Pipeline.from_pretrained(repo, backend="cuda") with its defaults, three renders with new prompts, then one at half
the size): first with empty caches (Triton kernels, our GEMM choices, gemlite configs), then again with the caches
the first one left. Prints a table, writes OUT.json/.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import full_size_repo, header, new_result, write_results

CHILD = """
import json, sys, time
t0 = time.perf_counter()
import torch
import bonsai
t1 = time.perf_counter()
pipe = bonsai.Pipeline.from_pretrained(sys.argv[1], backend="cuda")
torch.cuda.synchronize()
t2 = time.perf_counter()
size = int(sys.argv[2])
times, reports = [], []
for i in range(3):
    t = time.perf_counter()
    out = pipe(f"a bonsai tree on a desk, studio light {i}", width=size, height=size, seed=i, progress=False)
    times.append(time.perf_counter() - t)
    reports.append(str(out.report))
t = time.perf_counter()
pipe(f"a bonsai tree on a desk, studio light", width=size // 2, height=size // 2, seed=0, progress=False)
new_size = time.perf_counter() - t
print(json.dumps(dict(import_s=t1 - t0, load_s=t2 - t1, first_image_s=times[0], second_image_s=times[1],
                      third_image_s=times[2], new_size_image_s=new_size, to_first_image_s=t2 - t0 + times[0],
                      load_stages=dict(pipe.load_report, **pipe.runtime.load_report), first_report=reports[0],
                      report=reports[-1],
                      peak_gb=torch.cuda.max_memory_allocated() / 1e9)))
"""


def run_child(repo: Path, size: int, cache: Path) -> dict:
    env = dict(os.environ, BONSAI_CACHE=str(cache / "bonsai"), TRITON_CACHE_DIR=str(cache / "triton"),
               TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"))
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, str(repo), str(size)], env=env, capture_output=True,
                          text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"child failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), process_wall_s=wall)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="/tmp/bonsai-repos", help="folder of the synthetic repos")
    p.add_argument("--sizes", default="1024,512")
    p.add_argument("--out", default="benchmarks/results/cold")
    args = p.parse_args(argv)
    repo = full_size_repo(Path(args.repo), "gemlite", "ternary", device="cuda")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for size in (int(s) for s in args.sizes.split(",")):
            for cache_state in ("empty caches", "warm caches"):
                if cache_state == "empty caches":
                    for d in cache.iterdir():
                        subprocess.run(["rm", "-rf", str(d)], check=True)
                row = dict(size=size, caches=cache_state, **run_child(repo, size, cache))
                rows.append(row)
                print(f"{size}x{size} {cache_state:12s} import {row['import_s']:.2f} s  load {row['load_s']:.2f} s  "
                      f"first image {row['first_image_s']:.2f} s  second {row['second_image_s']:.2f} s  "
                      f"process start to first image {row['to_first_image_s']:.2f} s", flush=True)
    result = dict(new_result(argv), rows=rows)
    lines = header(result) + [
        "Fresh process per row: import bonsai, `Pipeline.from_pretrained(repo, backend=\"cuda\")` (defaults), three "
        "renders with new prompts (4 steps), then one at half the size. Repo: synthetic full-size gemlite ternary "
        "pack on local disk (page cache warm).", "",
        "| size | caches | import | load | first image | second image | third image | new size (half) | process "
        "start to first image |", "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['size']}² | {r['caches']} | {r['import_s']:.2f} s | {r['load_s']:.2f} s | {r['first_image_s']:.2f} s "
              f"| {r['second_image_s']:.2f} s | {r['third_image_s']:.2f} s | {r['new_size_image_s']:.2f} s "
              f"| {r['to_first_image_s']:.2f} s |" for r in rows]
    lines += ["", "Load stages (s): " + "; ".join(f"{r['size']}² {r['caches']}: " + ", ".join(
        f"{k} {v:.2f}" for k, v in r["load_stages"].items()) for r in rows)]
    lines += ["", "First image (`Result.report`): " + "; ".join(f"{r['size']}² {r['caches']}: {r['first_report']}"
                                                             for r in rows)]
    write_results(args.out, result, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
