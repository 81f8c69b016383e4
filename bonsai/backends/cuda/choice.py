"""Per-shape choice of the fast path's GEMM, by measurement on this GPU, persisted per GPU model.

A choice is keyed by (activations, bits, N, K, M): the first eager call of a layer at a new token count times
every candidate on that layer's own weights and input, and later calls (and CUDA graph captures) reuse the
winner. `load` / `save` keep the table in the user cache, so a new process skips the measurement.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch

log = logging.getLogger(__name__)

_CHOICES: dict[str, str] = {}


def key(activations: str, bits: int, n: int, k: int, m: int) -> str:
    return f"{activations}:{bits}:{n}:{k}:{m}"


def get(k: str) -> str | None:
    return _CHOICES.get(k)


def measure(k: str, candidates: dict[str, Callable[[], torch.Tensor]], reps: int = 10, trials: int = 3) -> str:
    """Time each candidate's GPU time, remember and return the fastest.

    Each trial queues `reps` calls behind a GPU sleep, so the timing is the kernels' own time and not the CPU's
    launch rate (the runtime replays CUDA graphs, where launches cost nothing); the best of `trials` counts.
    """
    times = {}
    for name, fn in candidates.items():
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # a Triton config that does not fit this GPU's shared memory is not a choice
            log.debug("candidate %s failed for %s: %s", name, k, exc)
            continue
        best = float("inf")
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda._sleep(2_000_000)  # ~1 ms of GPU work while the CPU queues the calls
            start.record()
            for _ in range(reps):
                fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / reps)
        times[name] = best
    if not times:
        raise RuntimeError(f"no GEMM candidate ran for {k}: {list(candidates)}")
    best = min(times, key=times.get)
    log.debug("%s: %s", k, {n: round(t, 4) for n, t in sorted(times.items(), key=lambda kv: kv[1])})
    _CHOICES[k] = best
    return best


def table() -> dict[str, str]:
    return dict(_CHOICES)


def clear() -> None:
    _CHOICES.clear()


def cache_path(directory: str | Path | None = None) -> Path:
    """Per-GPU-model table, e.g. ~/.cache/bonsai/gemm-NVIDIA_H100_80GB_HBM3.json (next to gemlite's)."""
    from .gemlite import gpu_cache_file

    return gpu_cache_file("gemm", directory)


def load(path: str | Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable GEMM choice cache %s: %s", path, exc)
        return False
    _CHOICES.update({str(k): str(v) for k, v in data.items()})
    return True


def save(path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(sorted(_CHOICES.items())), indent=1))
    tmp.replace(path)
