"""torch.profiler table of one `CudaRuntime.decode` at 1024x1024 through `Pipeline` with its defaults, after three
renders (full-size synthetic ternary gemlite repo). Prints the reports, the decode wall times and the table.

    python benchmarks/profile_decode.py
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import full_size_repo  # noqa: E402

import bonsai  # noqa: E402

repo = full_size_repo(Path("/tmp/bonsai-repos"), "gemlite", "ternary", device="cuda")
pipe = bonsai.Pipeline.from_pretrained(repo, backend="cuda")
for i in range(3):
    r = pipe(f"p{i}", width=1024, height=1024, progress=False)
    print(r.report)
rt = pipe.runtime
x = torch.randn(1, 4096, 128, device="cuda", dtype=torch.bfloat16)


def wall_ms(fn, n=5):
    out = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(round((time.perf_counter() - t0) * 1e3, 1))
    return out


print("decode wall ms", wall_ms(lambda: rt.decode(x, 1024, 1024)))
z = rt.vae.latents_to_vae(x, 1024, 1024)
with torch.inference_mode():
    print("vae.decode only ms", wall_ms(lambda: rt.vae.decode(z, None, 64, 16, "cosine")))
with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
    rt.decode(x, 1024, 1024)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
