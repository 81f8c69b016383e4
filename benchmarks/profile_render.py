"""torch.profiler of a warm 1024x1024 render through `Pipeline` with its defaults (full-size synthetic ternary
gemlite repo), after three renders, or of one `CudaRuntime.decode`. Prints the reports, wall times and the profiler
tables; `--trace` writes the render's Chrome trace (its GPU idle gaps are where the render waits on the host).

    python benchmarks/profile_render.py --stages render,decode --trace /tmp/out/h200-render-trace.json
"""

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_cuda import timed  # noqa: E402
from common import full_size_repo  # noqa: E402

import bonsai  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", default="render", help="render (a whole call), decode (one CudaRuntime.decode)")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--trace", help="write the render's Chrome trace here")
    args = ap.parse_args(argv)
    size = args.size
    repo = full_size_repo(Path("/tmp/bonsai-repos"), "gemlite", "ternary", device="cuda")
    pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
    for i in range(3):
        print(pipe(f"p{i}", width=size, height=size, progress=False).report)
    rt = pipe.runtime
    prompts = iter(f"q{i}" for i in range(100))
    x = torch.randn(1, (size // 16) ** 2, 128, device="cuda", dtype=torch.bfloat16)
    runs = dict(render=lambda: pipe(next(prompts), width=size, height=size, progress=False),
                decode=lambda: rt.decode(x, size, size))
    for stage in args.stages.split(","):
        print(f"{stage} wall ms", [round(t * 1e3, 1) for t in timed(runs[stage], 5)])
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            runs[stage]()
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "self_cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=70))
        if args.trace and stage == "render":
            prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    main()
