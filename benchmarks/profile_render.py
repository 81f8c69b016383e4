"""torch.profiler of a warm 1024x1024 render through `Pipeline` with its defaults (full-size synthetic ternary
gemlite repo), after three renders, or of one `CudaRuntime.encode` / `decode`. Prints the reports, wall times,
the profiler tables and the render's GPU idle gaps (where the device waits on the host) with the host work under
each; `--trace` keeps the render's Chrome trace.

    python benchmarks/profile_render.py --stages render,decode --trace /tmp/out/h200-render-trace.json
"""

import argparse
import gzip
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda import timed  # noqa: E402
from common import full_size_repo  # noqa: E402

import bonsai  # noqa: E402
from bonsai import latents  # noqa: E402
from bonsai.prompt import tokenize  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="render",
                    help="render (a whole call), encode (one CudaRuntime.encode), decode (one CudaRuntime.decode), "
                         "noise (the seeded noise, on the host), noise_torch (the same with torch.randn)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--trace", help="write the render's Chrome trace here")
    ap.add_argument("--stack", action="store_true", help="record Python frames (the gaps then name them)")
    args = ap.parse_args(argv)
    size = args.size
    repo = full_size_repo(Path("/tmp/bonsai-repos"), "gemlite", "ternary", device="cuda")
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
    for i in range(3):
        print(pipe(f"p{i}", width=size, height=size, progress=False).report)
    rt = pipe.runtime
    prompts = iter(f"q{i}" for i in range(100))
    x = torch.randn(1, (size // 16) ** 2, 128, device="cuda", dtype=torch.bfloat16)
    ids, mask = tokenize(pipe.tokenizer, ["a bonsai tree on a desk"], pipe.text_config.max_length)
    runs = dict(render=lambda: pipe(next(prompts), width=size, height=size, progress=False),
                encode=lambda: rt.encode(ids, mask), decode=lambda: rt.decode(x, size, size),
                noise=lambda: latents.noise(0, size, size, dtype=rt.dtype),
                noise_torch=lambda: torch.randn((1, 128, size // 16, size // 16), dtype=rt.dtype,
                                                generator=torch.Generator().manual_seed(0)))
    for stage in args.stages.split(","):
        print(f"{stage} wall ms", [round(t * 1e3, 1) for t in timed(runs[stage], 5)])
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU], with_stack=args.stack) as prof:
            runs[stage]()
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70))
        if stage == "render":
            trace = args.trace or str(Path(tempfile.mkdtemp()) / "render-trace.json")
            prof.export_chrome_trace(trace)
            print_gaps(trace)


def print_gaps(trace: str, min_us: float = 100.0, top: int = 12) -> None:
    """The GPU's idle spans of at least min_us inside the traced call, the host ops overlapping each and (with
    --stack) the innermost Python frame around it."""
    opener = gzip.open if trace.endswith(".gz") else open
    with opener(trace, "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    on_gpu = ("kernel", "gpu_memcpy", "gpu_memset")
    gpu = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") in on_gpu)
    host = [e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime")]
    frames = [e for e in events if e.get("cat") == "python_function"]
    start = min(e["ts"] for e in host)
    end = max(max(e["ts"] + e["dur"] for e in host), gpu[-1][1])
    gaps, busy_until = [], start
    for a, b in gpu:
        if a - busy_until >= min_us:
            gaps.append((busy_until, a))
        busy_until = max(busy_until, b)
    if end - busy_until >= min_us:
        gaps.append((busy_until, end))
    idle = sum(b - a for a, b in gaps)
    print(f"GPU idle gaps >= {min_us:.0f} us: {len(gaps)}, {idle / 1e3:.1f} ms of a {(end - start) / 1e3:.1f} ms call")
    for a, b in sorted(gaps, key=lambda g: g[0] - g[1])[:top]:
        under = {}
        for e in host:
            o = min(b, e["ts"] + e["dur"]) - max(a, e["ts"])
            if o > 0.2 * (b - a) or o > 200:
                under[e["name"]] = under.get(e["name"], 0.0) + o
        names = ", ".join(f"{n[:60]} {o / 1e3:.2f}" for n, o in sorted(under.items(), key=lambda x: -x[1])[:6])
        print(f"  at {(a - start) / 1e3:7.1f} ms: {(b - a) / 1e3:6.2f} ms idle; host: {names}")
        around = [e for e in frames if e["ts"] <= a + 0.5 * (b - a) <= e["ts"] + e["dur"]]
        if around:  # the frames live at the gap's middle, innermost first
            print("      in: " + " < ".join(e["name"][:70] for e in sorted(around, key=lambda e: e["dur"])[:4]))

if __name__ == "__main__":
    main()
