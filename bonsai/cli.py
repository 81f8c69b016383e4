"""`bonsai` command line: generate, batch, info, convert."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .convert import TARGETS

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
    pipe = _load(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = 0
    lines = Path(args.jobs).read_text().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
            if not isinstance(job, dict):
                raise ValueError("each line must be a JSON object")
            unknown = set(job) - {"prompt", "seed", "steps", "style", "aspect", "long_edge", "width", "height",
                                  "size", "out"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            result = pipe(**_job_kwargs(job), progress=False)
            target = out / (job.get("out") or f"job-{n:04d}.png")
            result.save(target)
            print(f"line {n}: {target} ({result.report.total_s:.2f} s)")
        except Exception as e:  # noqa: BLE001 - one bad job must not stop the batch; it is reported
            failed += 1
            print(f"line {n}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
    print(f"{len([l for l in lines if l.strip()]) - failed} done, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


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

    b = sub.add_parser("batch", help="render every job of a JSONL file with one model load")
    b.add_argument("jobs", help="JSONL: one object per line with prompt and optional size/aspect/long_edge/seed/style/steps/out")
    _add_model_args(b)
    b.add_argument("--out", default="bonsai-batch", help="output folder")
    b.set_defaults(func=cmd_batch)

    i = sub.add_parser("info", help="describe a repo folder: variant, layout, sizes")
    i.add_argument("dir")
    i.set_defaults(func=cmd_info)

    c = sub.add_parser("convert", help="convert a repo folder to another transformer layout")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", required=True, choices=TARGETS)
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
