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
