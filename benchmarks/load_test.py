"""Load test of `bonsai serve` over loopback: requests/s and p50/p95 latency at 1, 4 and 16 concurrent clients.

    python benchmarks/load_test.py --tiny /tmp/bonsai-tiny --backend torch --dtype float32 --size 64x64 \\
        --repeat 3 --requests 32 --duration 15 --out benchmarks/results/cpu-serve
    python benchmarks/load_test.py --model /tmp/bonsai-4b --backend cuda --size 1024x1024 \\
        --out benchmarks/results/h200-serve

Starts `bonsai serve --warmup SIZE` (the CLI, in a subprocess) on a free loopback port, or uses a running server
given with `--url` (loopback addresses only). Before measuring: one request of n = 1 to --max-batch images each
(every batch size once: CUDA graphs are captured per shape). Each concurrency level runs until `--requests`
answers or `--duration` seconds, whichever comes first (requests in flight at the deadline are waited for, up to
`--timeout`); `--repeat` runs the levels in turn several times. Every request has its own prompt and seed unless
`--same-prompt`. The mean batch size comes from the server's /metrics. Prints a table, writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait_healthy(url: str, timeout_s: float, proc: subprocess.Popen | None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} before it was ready")
        try:
            r = httpx.get(url + "/healthz", timeout=5)
            if r.status_code == 200:
                return r.json()
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server was not ready within {timeout_s} s")


def run_level(url: str, clients: int, args, first_seed: int) -> dict:
    """`clients` threads posting back to back until the request budget or the deadline is spent."""
    lock = threading.Lock()
    issued, latencies, statuses, timings = 0, [], {}, []
    deadline = time.monotonic() + args.duration

    def take() -> int | None:
        nonlocal issued
        with lock:
            if issued >= args.requests or time.monotonic() >= deadline:
                return None
            issued += 1
            return issued

    def client() -> None:
        with httpx.Client(timeout=args.timeout) as h:
            while (i := take()) is not None:
                seed = first_seed + i
                prompt = "a bonsai tree on a desk" if args.same_prompt else f"a bonsai tree on a desk, variation {seed}"
                body = {"prompt": prompt, "size": args.size, "steps": args.steps, "seed": seed, "n": args.n,
                        "output_format": args.output_format}
                t0 = time.perf_counter()
                try:
                    r = h.post(url + "/v1/images/generations", json=body, headers=args.headers)
                    status = r.status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                seconds = time.perf_counter() - t0
                with lock:
                    statuses[str(status)] = statuses.get(str(status), 0) + 1
                    if status == 200:
                        latencies.append(seconds)
                        timings.append(r.json()["bonsai"]["timings"])

    before = httpx.get(url + "/metrics").text
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/metrics").text
    batches = metric(after, "bonsai_batch_images_count") - metric(before, "bonsai_batch_images_count")
    batch_images = metric(after, "bonsai_batch_images_sum") - metric(before, "bonsai_batch_images_sum")
    ok = len(latencies)
    return {"clients": clients, "load_average_1min": load, "requests": issued, "ok": ok, "statuses": statuses, "wall_s": wall,
            "requests_per_s": ok / wall, "images_per_s": ok * args.n / wall,
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
            "mean_batch_images": batch_images / batches if batches else None,
            # The server's view: time waiting for a batch, and the batched call's render time.
            "queued_s_mean": float(np.mean([t["queued_s"] for t in timings])) if timings else None,
            "render_s_mean": float(np.mean([t["render_s"] for t in timings])) if timings else None,
            "latencies_s": [round(x, 4) for x in latencies]}


def combine(runs: list[dict]) -> dict:
    """One level's repeats: counts summed, rates the median over repeats, percentiles of all latencies."""
    latencies = [x for r in runs for x in r["latencies_s"]]

    def median(key):
        values = [r[key] for r in runs if r[key] is not None]
        return float(np.median(values)) if values else None

    statuses = {}
    for r in runs:
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    return {"clients": runs[0]["clients"], "repeats": len(runs), "requests": sum(r["requests"] for r in runs),
            "ok": sum(r["ok"] for r in runs), "statuses": statuses, "requests_per_s": median("requests_per_s"),
            "requests_per_s_each": [round(r["requests_per_s"], 3) for r in runs],
            "images_per_s": median("images_per_s"),
            "p50_s": float(np.percentile(latencies, 50)) if latencies else None,
            "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
            "mean_batch_images": median("mean_batch_images"), "queued_s_mean": median("queued_s_mean"),
            "render_s_mean": median("render_s_mean"), "runs": runs}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def runs_table(runs: list[dict]) -> str:
    lines = ["| repeat | clients | load average | ok | req/s | p50 | p95 | mean batch | mean batch render |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['repeat']} | {r['clients']} | {r['load_average_1min']:.2f} | {r['ok']} | "
                     f"{r['requests_per_s']:.2f} | {fmt(r['p50_s'], '.3f')} s | {fmt(r['p95_s'], '.3f')} s | "
                     f"{fmt(r['mean_batch_images'], '.2f')} | {fmt(r['render_s_mean'], '.3f')} s |")
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    f = fmt
    lines = ["| clients | requests | ok | req/s | images/s | p50 | p95 | mean batch (images) | mean queued | "
             "mean batch render |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['requests_per_s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {f(r['p50_s'], '.3f')} s | {f(r['p95_s'], '.3f')} s | "
                     f"{f(r['mean_batch_images'], '.2f')} | {f(r['queued_s_mean'], '.3f')} s | "
                     f"{f(r['render_s_mean'], '.3f')} s |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on a loopback address, e.g. http://127.0.0.1:8000")
    src.add_argument("--model", help="repo folder or id for a server this script starts")
    src.add_argument("--tiny", metavar="DIR", help="write (once) a tiny synthetic repo here and serve it")
    p.add_argument("--backend", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--size", default="512x512")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--n", type=int, default=1, help="images per request")
    p.add_argument("--output-format", choices=["png", "jpeg", "webp"], default="png")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="most requests per concurrency level and repeat")
    p.add_argument("--repeat", type=int, default=1, help="run the levels in turn this many times (medians)")
    p.add_argument("--duration", type=float, default=60.0, help="most seconds per concurrency level")
    p.add_argument("--no-warmup", action="store_true",
                   help="skip the warm-up requests (n = 1 to --max-batch images: every batch size once)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-delay-ms", type=float, default=10.0)
    p.add_argument("--same-prompt", action="store_true", help="one prompt for all requests (feature cache hits)")
    p.add_argument("--api-key", help="for --url servers that need one")
    p.add_argument("--start-timeout", type=float, default=900.0, help="seconds to wait for the server's model")
    p.add_argument("--out", help="OUT.json and OUT.md")
    args = p.parse_args()
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    load_before = os.getloadavg()[0]
    proc = None
    if args.url:
        url = args.url.rstrip("/")
        if urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"--url must be a loopback address ({', '.join(sorted(LOOPBACK))}), got {url}")
        server_cmd = None
    else:
        model = args.model
        if args.tiny:
            from bonsai import testing

            model = args.tiny
            if not (Path(model) / "model_index.json").is_file():
                testing.write_repo(model, layout="gemlite", kind="ternary", seed=0)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_cmd = [sys.executable, "-m", "bonsai.cli", "serve", "--model", str(model), "--backend", args.backend,
                      "--port", str(port), "--max-batch", str(args.max_batch), "--max-delay-ms",
                      str(args.max_delay_ms), "--max-queue", str(max(64, max(args.concurrency) * 2)),
                      "--warmup", args.size]
        if args.dtype:
            server_cmd += ["--dtype", args.dtype]
        proc = subprocess.Popen(server_cmd)
    try:
        health = wait_healthy(url, args.start_timeout, proc)
        for n in [] if args.no_warmup else range(1, min(args.max_batch, 10) + 1):  # the API allows n <= 10
            httpx.post(url + "/v1/images/generations", json={"prompt": "warm-up", "size": args.size,
                                                             "steps": args.steps, "seed": 0, "n": n},
                       headers=args.headers, timeout=args.timeout).raise_for_status()
        runs = []  # the levels in turn, `--repeat` times: a noisy neighbour then hits every level alike
        for rep in range(args.repeat):
            for k, clients in enumerate(args.concurrency):
                runs.append({"repeat": rep + 1, **run_level(url, clients, args, 100_000 * rep + 1000 * (k + 1))})
                print(f"repeat {rep + 1}: " + table(runs[-1:]).splitlines()[-1], flush=True)
        rows = [combine([r for r in runs if r["clients"] == c]) for c in args.concurrency]
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()

    import torch

    machine = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
               "cpus": os.cpu_count(),
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]}}
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    result = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine,
              "server": health, "server_command": server_cmd,
              "settings": {k: getattr(args, k) for k in ("size", "steps", "n", "requests", "duration", "repeat",
                                                         "no_warmup", "max_batch", "max_delay_ms", "same_prompt",
                                                         "backend", "dtype")},
              "rows": rows}
    md = "\n".join([
        f"Command: `{command}`  ",
        f"Date: {result['date']}; {machine['gpu'] or platform.processor() or platform.machine()}, "
        f"{machine['cpus']} CPUs; torch {machine['torch']}; server: {health.get('backend')} backend, "
        f"{health.get('variant')}, model {health.get('model')}; 1-minute load average {load_before:.2f} at the "
        f"start, {machine['load_average_1min']['end']:.2f} at the end.",
        "",
        f"`bonsai serve` over loopback, {args.size}, {args.steps} steps, n={args.n}, {args.output_format}, "
        f"--max-batch {args.max_batch}, "
        f"--max-delay-ms {args.max_delay_ms:g}; each level: at most {args.requests} requests or {args.duration:g} s, "
        f"the levels run in turn {args.repeat} time(s) (req/s: the median over repeats; p50/p95: over all "
        "requests of the level); "
        f"{'one prompt' if args.same_prompt else 'a new prompt and seed per request'}. Latency is client-side, "
        "request sent to answer read (only 200s); the mean batch is images per batched forward, from /metrics; "
        "mean queued and mean batch render are the server's `timings.queued_s` and `timings.render_s` (the whole "
        "batched call a request was in).",
        "",
        table(rows), "",
        "Each run (the load average is the machine's 1-minute load when the level started: other jobs share it):",
        "", runs_table(runs), ""])
    print("\n" + md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
        Path(args.out + ".md").write_text(md)


if __name__ == "__main__":
    main()
