"""A background sampler of a memory reading (MLX active memory, process RSS) while a stage runs."""

from __future__ import annotations

import os
import threading
import time
from typing import Callable

import numpy as np

SAMPLE_EVERY_S = 0.05


def rss_bytes() -> int | None:
    """The process's resident memory now (Linux /proc), None where it cannot be read cheaply."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MemorySampler:
    """Samples `read()` (bytes) every 50 ms in a background thread inside a `with` block."""

    def __init__(self, read: Callable[[], int | None], every_s: float = SAMPLE_EVERY_S):
        self.read = read
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (time, bytes)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        value = self.read()
        if value is not None:
            self.samples.append((time.perf_counter(), value))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def peak_gb(self) -> float | None:
        return max(b for _, b in self.samples) / 1e9 if self.samples else None

    def summary(self) -> dict:
        return summarize(self.samples)


def summarize(samples: list[tuple[float, int]]) -> dict:
    """(time, bytes) samples -> seconds, GB*s (trapezoid integral), mean and max active GB."""
    if len(samples) < 2:
        gb = samples[0][1] / 1e9 if samples else 0.0
        return {"seconds": 0.0, "gb_s": 0.0, "mean_active_gb": gb, "max_active_gb": gb, "samples": len(samples)}
    t = np.array([s[0] for s in samples])
    gb = np.array([s[1] for s in samples]) / 1e9
    seconds = float(t[-1] - t[0])
    gb_s = float(np.sum((gb[1:] + gb[:-1]) / 2 * np.diff(t)))
    return {"seconds": seconds, "gb_s": gb_s, "mean_active_gb": gb_s / seconds if seconds > 0 else float(gb.mean()),
            "max_active_gb": float(gb.max()), "samples": len(samples)}


# Activations of one render beyond the resident weights, fitted to H100 bf16 peaks (decode dominates):
# 1024x1024: 3.2 GB, 512x512: 1.1 GB, i.e. about 0.5 GB + 3000 bytes per pixel and image.
RENDER_FIXED_BYTES = 512 << 20
RENDER_BYTES_PER_PIXEL = 3000


def render_bytes(batch: int, pixels: int) -> int:
    """Estimated device memory a render of `batch` images of `pixels` each needs on top of the resident models."""
    return RENDER_FIXED_BYTES + RENDER_BYTES_PER_PIXEL * batch * pixels


def keep_resident(free_bytes: int, need_bytes: int, margin: float = 1.25) -> bool:
    """Whether a resident model may stay: the free memory left next to it still holds `need_bytes` with margin."""
    return free_bytes >= margin * need_bytes


def cuda_bytes(device) -> dict[str, int]:
    """The CUDA caching allocator's bytes: allocated now ("current"), its peak since the last reset ("peak"),
    reserved from the driver ("reserved") and that peak ("peak_reserved": unlike "peak", it counts the memory
    CUDA graphs use as they replay, which their private pools hold outside the allocated count). One stats call:
    `torch.cuda.memory_allocated` and its siblings each flatten the whole stats tree in Python (three of them took
    2.2 ms of host time at the end of a profiled render, `benchmarks/results/h200-render-gaps-512.log`)."""
    import torch

    stats = torch.cuda.memory_stats_as_nested_dict(device)
    allocated = stats.get("allocated_bytes", {}).get("all", {})  # empty before the first allocation
    reserved = stats.get("reserved_bytes", {}).get("all", {})
    return dict(current=allocated.get("current", 0), peak=allocated.get("peak", 0),
                reserved=reserved.get("current", 0), peak_reserved=reserved.get("peak", 0))


def available_bytes(device) -> int | None:
    """Free memory for new allocations on a torch device: CUDA's free memory plus the allocator's unused cache;
    on a CPU, MemAvailable from /proc/meminfo. None where unknown."""
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        held = cuda_bytes(device)
        return free + held["reserved"] - held["current"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None
