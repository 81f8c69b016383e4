"""`bonsai` command line: generate, batch, info, convert, serve. Arguments are checked before any model is loaded."""

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
        rows = jobs.run(args.jobs, args.out, jobs.in_process(lambda: _load(args, _backend(args))), **common)
    else:
        from .distributed import render_jobs

        # The backend is resolved on each worker (the driver may have no GPU); the default model follows the
        # backend named here.
        model = args.model or DEFAULT_MODELS["mlx" if args.backend == "mlx" else "other"]
        rows = render_jobs(args.jobs, model, args.out, address=args.ray, workers=args.workers,
                           gpus_per_worker=args.gpus_per_worker, backend=args.backend, device=args.device,
                           dtype=args.dtype, local_files_only=args.offline,
                           loras=[parse_lora(v) for v in args.lora], **common)
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


def cmd_serve(args) -> int:
    import os

    from . import params
    from .sizes import parse_size

    try:
        from .serve.app import ServeConfig, create_app
        from .serve.engine import warm_up
        from .serve.server import server
    except ImportError as e:
        raise ImportError(f"bonsai serve needs the serve extra: pip install -e '.[serve]' ({e.name} is missing)") \
            from None

    # Every argument checked before the server starts and the model loads.
    backend = _backend(args)
    params.integer(args.port, "--port", 0, 65535)
    warmup = [params.size(*parse_size(s)) for s in args.warmup]
    for value in args.lora:  # checked now, loaded with the model
        parse_lora(value)
    model = args.model or DEFAULT_MODELS["mlx" if backend.value == "mlx" else "other"]
    name = args.served_model_name or (Path(model).name if Path(model).is_dir() else model)
    api_key = args.api_key if args.api_key is not None else os.environ.get("BONSAI_API_KEY") or None
    config = ServeConfig(model_name=name, max_batch=args.max_batch, max_delay_ms=args.max_delay_ms,
                         max_queue=args.max_queue, api_key=api_key, max_body_bytes=args.max_body_bytes,
                         max_pixels=args.max_pixels, url_store_mb=args.url_store_mb,
                         shutdown_timeout_s=args.shutdown_timeout)
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        logging.warning("serving on %s without an API key: anyone who can reach it can render", args.host)
    load_args = argparse.Namespace(**{**vars(args), "model": model})

    def load():
        pipe = _load(load_args, backend)  # with the --lora adapters
        warm_up(pipe, warmup, config.max_batch)
        return pipe

    def load_failed(_message: str) -> None:
        http.should_exit = True  # the error is printed below, after uvicorn has stopped

    app = create_app(config, load, on_load_failed=load_failed)
    http = server(app, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    print(f"bonsai serve: http://{args.host}:{args.port}/ (model {name}, loading in the background)",
          file=sys.stderr)
    try:
        http.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        return 130
    if app.state.engine.error:
        print(f"bonsai: error: the model failed to load: {app.state.engine.error}", file=sys.stderr)
        return 2
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

    s = sub.add_parser("serve", help="an OpenAI-compatible image API and a studio page (needs the serve extra)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="most images per batched denoise (default 8)")
    s.add_argument("--max-delay-ms", type=float, default=10.0,
                   help="how long a request waits for others of its size to batch with (default 10)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429 (default 64)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $BONSAI_API_KEY, or none)")
    s.add_argument("--max-pixels", type=int, default=2048 * 2048,
                   help="largest width*height a request may ask for (default 2048*2048)")
    s.add_argument("--max-body-bytes", type=int, default=64 * 1024, help="request bodies above this get 413")
    s.add_argument("--url-store-mb", type=float, default=256.0,
                   help="memory for images of response_format=url, oldest dropped first (default 256)")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may finish at shutdown before they get 503 (default 30)")
    s.add_argument("--served-model-name", help="model id in /v1/models (default: the repo id or folder name)")
    s.add_argument("--warmup", action="append", default=[], metavar="WxH",
                   help="render 1-step batches of 1 to --max-batch images of this size before reporting ready "
                        "(repeatable)")
    s.set_defaults(func=cmd_serve)

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
