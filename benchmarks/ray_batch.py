"""Ray scale-out of `bonsai batch`: images/s and scaling with W workers against the single-process batch.

    python benchmarks/ray_batch.py --repo /tmp/bonsai-4b-synthetic --write-repo --jobs 256 --workers 1,2,4,8 \
        --batch-size 4 --out benchmarks/results/h200-ray

Writes an N-job JSONL of mixed sizes (the sizes cycle; seeds from the line numbers), runs the single-process
`bonsai batch` once and `bonsai batch --ray auto --workers W` for each W, each in a fresh process into its own
folder, as a user would. Reports per run: wall time, images/s end to end (process start to last image) and steady
(first image to last), scaling efficiency (images/s of W workers / (W x images/s of the single process)), time to
first image and peak memory per worker (from results.jsonl), and checks that every output exists exactly once and
has the single-process pixels (max difference; <= 2/255 expected in float32, bf16 can differ more where the batch
composition changed by a retry). Prints a table, writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = ["a bonsai tree on a desk, studio light", "a lighthouse at dusk, oil painting", "a red fox in snow",
           "a bowl of ramen, top view", "an old map of an island", "a robot watering plants"]


def write_jobs(path: Path, n: int, sizes: list[str], steps: int) -> list[str]:
    """n jobs cycling through sizes; returns the output names `bonsai batch` gives them."""
    lines = [{"prompt": PROMPTS[i % len(PROMPTS)], "size": sizes[i % len(sizes)], "steps": steps} for i in range(n)]
    path.write_text("".join(json.dumps(l) + "\n" for l in lines))
    return [f"job-{i + 1:04d}.png" for i in range(n)]


def run_batch(args, jobs: Path, out: Path, workers: int | None) -> dict:
    cmd = [sys.executable, "-m", "bonsai.cli", "batch", str(jobs), "--model", args.repo, "--backend", args.backend,
           "--out", str(out), "--batch-size", str(args.batch_size), "--overwrite", "-q"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    if workers is not None:
        cmd += ["--ray", args.address, "--workers", str(workers)]
        if args.gpus_per_worker is not None:
            cmd += ["--gpus-per-worker", str(args.gpus_per_worker)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    done = [r for r in rows if r["status"] == "done"]
    finished = sorted(r["finished_at"] for r in done)
    per_worker = {}
    for r in done:
        w = per_worker.setdefault(r["worker"], dict(images=0, first_image_s=float("inf"), peak_memory_gb=0.0))
        w["images"] += 1
        w["first_image_s"] = min(w["first_image_s"], r["finished_at"] - t0)
        w["peak_memory_gb"] = max(w["peak_memory_gb"], r["peak_memory_gb"] or 0.0)
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else None
    return dict(command=" ".join(cmd), workers=workers, wall_s=wall, images=len(done),
                failed=sum(r["status"] == "failed" for r in rows), retried=sum((r["attempt"] or 1) > 1 for r in done),
                images_per_s=len(done) / wall, steady_images_per_s=steady, per_worker=per_worker)


def check(single: Path, other: Path, names: list[str]) -> dict:
    """Every output exactly once (no temp files, nothing else) and its pixel difference to the single process."""
    import numpy as np
    from PIL import Image

    files = sorted(str(p.relative_to(other)) for p in other.rglob("*") if p.is_file())
    expected = sorted(names + ["results.jsonl"])
    worst, exact = 0, 0
    for name in names:
        a = np.asarray(Image.open(single / name).convert("RGB"), dtype=np.int16)
        b = np.asarray(Image.open(other / name).convert("RGB"), dtype=np.int16)
        diff = int(np.abs(a - b).max()) if a.shape == b.shape else 255
        worst, exact = max(worst, diff), exact + (diff == 0)
    return dict(files_ok=files == expected, extra_files=sorted(set(files) - set(expected)),
                missing=sorted(set(expected) - set(files)), max_diff=worst, exact_images=exact)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", default="/tmp/bonsai-4b-synthetic", help="model folder (or repo id) for every run")
    p.add_argument("--write-repo", action="store_true", help="write the full-size synthetic repo of cold_start.py")
    p.add_argument("--jobs", type=int, default=128)
    p.add_argument("--sizes", default="1024x1024,512x512,768x1024", help="sizes the jobs cycle through")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--workers", default="1,2,4,8", help="Ray worker counts to run")
    p.add_argument("--gpus-per-worker", type=float, help="default: 1 on a cluster with GPUs, else CPU workers")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", help="float32 for the <= 2/255 pixel check; default: the backend's")
    p.add_argument("--address", default="auto", help="Ray address ('auto': a running cluster or a local runtime)")
    p.add_argument("--work", default="/tmp/bonsai-ray-bench", help="folder for the JSONL and the outputs")
    p.add_argument("--out", default="benchmarks/results/ray-batch", help="OUT.json and OUT.md")
    args = p.parse_args(argv)
    if args.write_repo:
        sys.path.insert(0, str(Path(__file__).parent))
        from cold_start import write_repo

        write_repo(Path(args.repo))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    names = write_jobs(work / "jobs.jsonl", args.jobs, args.sizes.split(","), args.steps)

    runs = [dict(run_batch(args, work / "jobs.jsonl", work / "single", None), label="single process")]
    base = runs[0]
    print(f"single process: {base['images_per_s']:.2f} images/s ({base['wall_s']:.1f} s)", flush=True)
    for w in (int(x) for x in args.workers.split(",")):
        r = run_batch(args, work / "jobs.jsonl", work / f"ray-{w}", w)
        r.update(label=f"ray, {w} workers", check=check(work / "single", work / f"ray-{w}", names),
                 efficiency=r["images_per_s"] / (w * base["images_per_s"]),
                 steady_efficiency=(r["steady_images_per_s"] / (w * base["steady_images_per_s"])
                                    if r["steady_images_per_s"] and base["steady_images_per_s"] else None))
        runs.append(r)
        print(f"{r['label']}: {r['images_per_s']:.2f} images/s, efficiency {r['efficiency']:.2f}, "
              f"check {r['check']}", flush=True)

    import torch

    result = dict(command="python benchmarks/ray_batch.py " + " ".join(argv or sys.argv[1:]),
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), torch=torch.__version__,
                  gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  cpus=os.cpu_count(), jobs=args.jobs, sizes=args.sizes, steps=args.steps,
                  batch_size=args.batch_size, runs=runs)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"Command: `{result['command']}`  ", f"Date: {result['date']}; GPUs: {result['gpus'] or 'none'}; "
             f"torch {result['torch']}; {args.jobs} jobs cycling {args.sizes}, {args.steps} steps, batch size "
             f"{args.batch_size}.", "",
             "| run | wall | images/s | steady images/s | efficiency | steady eff. | first image per worker | "
             "peak GB per worker | retried | outputs once | max pixel diff |", "|---" * 11 + "|"]
    for r in runs:
        firsts = ", ".join(f"{w['first_image_s']:.1f}" for w in sorted(r["per_worker"].values(),
                                                                       key=lambda w: w["first_image_s"]))
        peaks = ", ".join(f"{w['peak_memory_gb']:.1f}" for w in r["per_worker"].values())
        c = r.get("check", {})
        lines.append(f"| {r['label']} | {r['wall_s']:.1f} s | {r['images_per_s']:.2f} | "
                     f"{fmt(r['steady_images_per_s'], '.2f')} | {fmt(r.get('efficiency'), '.2f')} | "
                     f"{fmt(r.get('steady_efficiency'), '.2f')} | {firsts} s | {peaks} | {r['retried']} | "
                     f"{c.get('files_ok', '-')} | {c.get('max_diff', '-')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    bad = [r["label"] for r in runs[1:] if not r["check"]["files_ok"] or r["failed"]]
    if bad:
        raise SystemExit(f"outputs missing, duplicated or failed in: {', '.join(bad)}")


if __name__ == "__main__":
    main()
