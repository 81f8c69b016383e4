"""What the benchmark scripts share: synthetic full-size repos, timing, version info and result files."""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

PROMPTS = [f"a bonsai tree on a wooden desk, soft light, photo {i}" for i in range(64)]  # distinct: no cache hits


def full_size_repo(root: Path, layout: str, kind: str, device: str | None = None) -> Path:
    """A repo of the real shapes (klein-4B transformer, FLUX.2 VAE, Qwen3-4B text encoder cut to the 27 layers
    the features read) with random weights in `layout`, written once under root/<kind>-<layout>."""
    from bonsai import testing

    path = root / f"{kind}-{layout}"
    if not (path / "model_index.json").is_file():
        t0 = time.perf_counter()
        testing.write_full_size_repo(path, layout, kind, device=device)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median(values) -> float:
    return statistics.median(list(values))


def versions() -> dict:
    import torch

    out = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine())
    if torch.cuda.is_available():
        out.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    for name in ("triton", "gemlite", "diffusers", "transformers"):
        try:
            out[name] = __import__(name).__version__
        except (ImportError, AttributeError):
            out[name] = None
    return out


def write_results(out: str | Path, result: dict, markdown: str) -> None:
    """OUT.json (everything) and OUT.md (the tables), and the tables on stdout."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown)
    print(markdown, flush=True)


def header(result: dict) -> list[str]:
    v = result["versions"]
    return [f"Command: `{result['command']}`  ",
            f"Date: {result['date']}; {v.get('gpu', v['machine'])}; torch {v['torch']}, triton {v.get('triton')}, "
            f"gemlite {v.get('gemlite')}, diffusers {v.get('diffusers')}.", ""]


def new_result(argv) -> dict:
    return dict(command="python " + " ".join([Path(sys.argv[0]).as_posix(), *(argv or sys.argv[1:])]),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), versions=versions())
