"""`bonsai` command line: generate, batch, info, convert."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

DEFAULT_MODELS = {
    "mlx": "prism-ml/bonsai-image-ternary-4B-mlx-2bit",
    "other": "prism-ml/bonsai-image-ternary-4B-gemlite-2bit",
}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="repo id or local folder (default: the ternary repo for the backend)")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "cuda", "mlx"])
    p.add_argument("--device", help="torch device for the torch backend (default cpu)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype")
    p.add_argument("--offline", action="store_true", help="use only the local HF cache")


def _load(args):
    from .backends import resolve
    from .pipeline import Pipeline

    backend = resolve(args.backend)
    model = args.model or DEFAULT_MODELS["mlx" if backend.value == "mlx" else "other"]
    dtype = args.dtype
    if dtype is not None and backend.value != "mlx":
        import torch

        dtype = getattr(torch, dtype)
    return Pipeline.from_pretrained(model, backend=backend.value, device=args.device, dtype=dtype,
                                    local_files_only=args.offline)


def _job_kwargs(job: dict) -> dict:
    kwargs = {k: job[k] for k in ("prompt", "seed", "steps", "style", "aspect", "long_edge", "width", "height")
              if job.get(k) is not None}
    if job.get("size"):
        from .sizes import parse_size

        kwargs["width"], kwargs["height"] = parse_size(job["size"])
    return kwargs


def cmd_generate(args) -> int:
    pipe = _load(args)
    kwargs = _job_kwargs(vars(args))
    result = pipe(**kwargs, progress=not args.quiet)
    out = Path(args.out)
    paths = result.save(out)
    for p in paths:
        print(p)
    print(result.report, file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    from . import jobs
    from .errors import BonsaiValueError

    def report(row):
        if row["status"] == "failed":
            from tqdm.auto import tqdm

            tqdm.write(f"line {row['line']}: FAILED: {row['error']}", file=sys.stderr)

    common = dict(batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.quiet, on_row=report)
    if args.ray is None:
        if args.workers is not None or args.gpus_per_worker is not None:
            raise BonsaiValueError("--workers and --gpus-per-worker need --ray")
        rows = jobs.run(args.jobs, args.out, jobs.in_process(lambda: _load(args)), **common)
    else:
        from .distributed import render_jobs

        # The backend is resolved on each worker (the driver may have no GPU); the default model follows the
        # backend named here.
        model = args.model or DEFAULT_MODELS["mlx" if args.backend == "mlx" else "other"]
        rows = render_jobs(args.jobs, model, args.out, address=args.ray, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker, backend=args.backend, device=args.device,
                           dtype=args.dtype, local_files_only=args.offline, **common)
    print(jobs.summary(rows), file=sys.stderr)
    return 1 if any(r["status"] == "failed" for r in rows) else 0


def cmd_info(args) -> int:
    from . import weights

    info = weights.describe(Path(args.dir))
    print(json.dumps(info.as_dict(), indent=2))
    return 0


def cmd_convert(args) -> int:
    from .convert import convert

    convert(Path(args.src), Path(args.dst), to=args.to)
    print(args.dst)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonsai", description="Bonsai Image 4B text-to-image")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render one image")
    g.add_argument("-p", "--prompt", required=True)
    _add_model_args(g)
    size = g.add_mutually_exclusive_group()
    size.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 512x512)")
    size.add_argument("--aspect", help="W:H, used with --long-edge")
    g.add_argument("--long-edge", type=int, help="pixels of the longer side, with --aspect (default 1024)")
    g.add_argument("--seed", type=int)
    g.add_argument("--steps", type=int, default=4)
    g.add_argument("--style")
    g.add_argument("--out", default="bonsai.png", help="PNG file (default bonsai.png)")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)

    b = sub.add_parser("batch", help="render every job of a JSONL file with one model load (per worker)")
    b.add_argument("jobs", help="JSONL: one object per line with prompt and optional size/width/height/aspect/"
                                "long_edge/seed/style/steps/out (a job without seed uses its line number)")
    _add_model_args(b)
    b.add_argument("--out", default="bonsai-batch", help="output folder (also gets results.jsonl)")
    b.add_argument("--batch-size", type=int, default=1, help="same-size jobs rendered together (default 1)")
    b.add_argument("--overwrite", action="store_true", help="render jobs whose output exists (default: skip them)")
    b.add_argument("--ray", nargs="?", const="auto", metavar="auto|ADDRESS",
                   help="render on Ray workers: 'auto' (a running cluster, else a local runtime) or an address")
    b.add_argument("--workers", type=int, help="Ray workers (default: one per GPU; one on a CPU machine)")
    b.add_argument("--gpus-per-worker", type=float, help="GPUs per Ray worker (default 1; 0 without GPUs)")
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)

    i = sub.add_parser("info", help="describe a repo folder: variant, layout, sizes")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a repo folder to another transformer layout")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=["gemlite", "mlx", "compact"])
    c.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError, ImportError, RuntimeError) as e:
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
