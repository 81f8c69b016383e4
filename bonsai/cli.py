"""`bonsai` command line: generate, batch, info, convert, serve."""

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


def _lora_arg(value: str) -> tuple[str, float]:
    """PATH[:SCALE] -> (path, scale); a path may contain ':' when no scale follows."""
    path, sep, scale = value.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return value, 1.0


def cmd_serve(args) -> int:
    import os

    from . import params
    from .backends import resolve
    from .sizes import parse_size

    try:
        from .serve.app import ServeConfig, create_app
        from .serve.engine import warm_up
        from .serve.server import server
    except ImportError as e:
        raise ImportError(f"bonsai serve needs the serve extra: pip install -e '.[serve]' ({e.name} is missing)") \
            from None

    # Every argument checked before the server starts and the model loads.
    backend = resolve(args.backend)
    params.integer(args.port, "--port", 0, 65535)
    warmup = [params.size(*parse_size(s)) for s in args.warmup]
    loras = [_lora_arg(v) for v in args.lora]
    if loras:
        from .pipeline import Pipeline

        if not hasattr(Pipeline, "load_lora"):
            raise ValueError("--lora: this bonsai has no LoRA support (Pipeline.load_lora)")
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
        pipe = _load(load_args)
        for path, scale in loras:
            pipe.load_lora(path, scale=scale)
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

    s = sub.add_parser("serve", help="an OpenAI-compatible image API and a studio page (needs the serve extra)")
    _add_model_args(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=int, default=8, help="most images per batched denoise (default 8)")
    s.add_argument("--max-delay-ms", type=float, default=10.0,
                   help="how long a request waits for others of its size to batch with (default 10)")
    s.add_argument("--max-queue", type=int, default=64, help="requests waiting; more get 429 (default 64)")
    s.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1 (default: $BONSAI_API_KEY, or none)")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]", help="LoRA to load (repeatable)")
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
