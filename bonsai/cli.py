"""`bonsai` command line: generate, batch, info, convert. Arguments are checked before any model is loaded."""

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
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="a LoRA file, folder or repo id, strength SCALE (default 1.0); repeatable")


def _backend(args):
    """The backend, checked to be usable here (cheaply: before any download or model load)."""
    from .backends import check_available, resolve

    backend = resolve(args.backend)
    check_available(backend, args.device)
    return backend


def parse_lora(value: str) -> tuple[str, float]:
    """"path" -> (path, 1.0); "path:0.7" -> (path, 0.7)."""
    from . import params

    path, sep, scale = value.rpartition(":")
    try:
        number = float(scale) if sep and path else None
    except ValueError:
        number = None  # a colon in the path itself
    if number is None:
        return value, 1.0
    return path, params.finite(number, f"--lora {value}: scale", -10.0, 10.0)


def _load(args, backend):
    from .pipeline import Pipeline

    loras = [parse_lora(v) for v in args.lora]  # checked before the model loads
    model = args.model or DEFAULT_MODELS["mlx" if backend.value == "mlx" else "other"]
    pipe = Pipeline.from_pretrained(model, backend=backend.value, device=args.device, dtype=args.dtype,
                                    local_files_only=args.offline)
    for path, scale in loras:
        pipe.load_lora(path, scale=scale)
    return pipe


def _job_kwargs(job: dict) -> dict:
    kwargs = {k: job[k] for k in ("prompt", "seed", "steps", "style", "aspect", "long_edge", "width", "height")
              if job.get(k) is not None}
    if job.get("size"):
        from .sizes import parse_size

        kwargs["width"], kwargs["height"] = parse_size(job["size"])
    return kwargs


def _generate_request(args):
    from . import params
    from .sizes import parse_size

    width = height = None
    if args.size:
        width, height = parse_size(args.size)
    return params.check(args.prompt, width, height, args.steps, args.seed, args.style, args.aspect, args.long_edge)


def _open_image(path: str, flag: str):
    from PIL import Image, UnidentifiedImageError

    from .errors import BonsaiValueError

    try:
        with Image.open(path) as img:
            img.load()
            return img.copy()
    except FileNotFoundError:
        raise BonsaiValueError(f"{flag}: no such file {path}") from None
    except (UnidentifiedImageError, OSError) as e:
        raise BonsaiValueError(f"{flag}: {path} is not a readable image ({e})") from None


def cmd_generate(args) -> int:
    from .errors import BonsaiValueError

    images = [_open_image(p, "--image") for p in args.image] or None
    init = _open_image(args.init_image, "--init-image") if args.init_image else None
    if args.strength is not None and init is None:
        raise BonsaiValueError("--strength applies to image-to-image: pass --init-image too")
    req = _generate_request(args)
    out = Path(args.out)
    if out.suffix.lower() != ".png":
        raise BonsaiValueError(f"--out must be a .png file, got {args.out!r}")
    if not out.parent.is_dir():
        raise BonsaiValueError(f"--out: folder {out.parent} does not exist")
    pipe = _load(args, _backend(args))
    size = {} if (images or init) and not (args.size or args.aspect) else dict(width=req.width, height=req.height)
    result = pipe(req.prompts[0], **size, steps=req.steps, seed=req.seeds[0], style=req.style, image=images,
                  init_image=init, strength=1.0 if args.strength is None else args.strength,
                  progress=not args.quiet)
    for p in result.save(out):
        print(p)
    print(result.report, file=sys.stderr)
    return 0


def cmd_batch(args) -> int:
    pipe = _load(args, _backend(args))
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
    from . import __version__
    from .sizes import STYLES

    parser = argparse.ArgumentParser(prog="bonsai", description="Bonsai Image 4B text-to-image")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--version", action="version", version=f"bonsai {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="render one image")
    g.add_argument("-p", "--prompt", required=True)
    _add_model_args(g)
    size = g.add_mutually_exclusive_group()
    size.add_argument("--size", help="WIDTHxHEIGHT, multiples of 16 (default 512x512)")
    size.add_argument("--aspect", help="W:H, used with --long-edge")
    g.add_argument("--long-edge", type=int, help="pixels of the longer side, with --aspect (default 1024)")
    g.add_argument("--seed", type=int, help="0 to 2**32 - 1 (default: random)")
    g.add_argument("--steps", type=int, default=4, help="Euler steps, 1 to 50 (default 4, what the model is made for)")
    g.add_argument("--style", choices=list(STYLES), metavar="STYLE", help=f"one of: {', '.join(STYLES)}")
    g.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="a reference image to edit or take elements from (repeatable, up to 4)")
    g.add_argument("--init-image", metavar="FILE", help="image-to-image: start from this image")
    g.add_argument("--strength", type=float, help="image-to-image: 0 < strength <= 1 (default 1.0: ignore it)")
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
    from .errors import BonsaiError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bonsai: interrupted", file=sys.stderr)
        return 130
    except (BonsaiError, ValueError, FileNotFoundError, NotADirectoryError, FileExistsError, ImportError,
            RuntimeError) as e:
        print(f"bonsai: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
