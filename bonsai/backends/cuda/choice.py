"""Per-shape choice of the fast path's GEMM, by measurement on this GPU, persisted per GPU model.

A choice is keyed by (linear mode, activations, bits, N, K, M): the first eager call of a layer at a new token count
times every candidate on that layer's own weights and input, and later calls (and CUDA graph captures) reuse the
winner. A `GemmChoices` table belongs to one runtime; `load` / `save` keep it in the user cache as JSON records
(one object per choice, fields by name), so a new process skips the measurement.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1


@dataclass(frozen=True)
class GemmKey:
    """What a choice depends on. linear: the layer's mode ("auto", "expand", "fused": each picks among its own
    candidates); activations: "fp8" or the input dtype's name ("bfloat16", "float16"); bits: 1 binary, 2 ternary;
    n, k: out and in features; m: tokens."""

    linear: str
    activations: str
    bits: int
    n: int
    k: int
    m: int


@dataclass(frozen=True)
class GemmChoice:
    """The GEMM picked for `key` and the GPU time per call of each candidate measured (ms; empty if not measured)."""

    key: GemmKey
    impl: str
    times_ms: tuple[tuple[str, float], ...] = ()

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self.key), "impl": self.impl, "times_ms": dict(self.times_ms)}

    @classmethod
    def from_json(cls, entry) -> GemmChoice:
        """One record of the cache file; BonsaiValueError naming the field if it is missing or of the wrong type."""
        from ...errors import BonsaiValueError

        if not isinstance(entry, dict):
            raise BonsaiValueError(f"a GEMM choice must be a JSON object, got {type(entry).__name__}")
        types = {f.name: f.type for f in dataclasses.fields(GemmKey)} | {"impl": "str", "times_ms": "dict"}
        unknown = sorted(set(entry) - set(types))
        if unknown:
            raise BonsaiValueError(f"GEMM choice has unknown fields {unknown}")
        missing = sorted(set(types) - set(entry) - {"times_ms"})
        if missing:
            raise BonsaiValueError(f"GEMM choice is missing fields {missing}")
        for name, kind in types.items():
            value = entry.get(name, {})
            # bool is an int to isinstance; a flag is never a valid size.
            if not isinstance(value, {"str": str, "int": int, "dict": dict}[kind]) or isinstance(value, bool):
                raise BonsaiValueError(f"GEMM choice field {name!r}: expected {kind}, got {value!r}")
        times = entry.get("times_ms", {})
        if not all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in times.items()):
            raise BonsaiValueError(f"GEMM choice field 'times_ms': expected {{impl: ms}}, got {times!r}")
        key = GemmKey(**{f.name: entry[f.name] for f in dataclasses.fields(GemmKey)})
        return cls(key, entry["impl"], tuple((k, float(v)) for k, v in times.items()))


def time_candidates(candidates: dict[str, Callable[[], torch.Tensor]], reps: int = 10,
                    trials: int = 3) -> dict[str, float]:
    """GPU ms per call of each candidate that runs (a Triton config that does not fit this GPU is left out).

    Each trial queues `reps` calls behind a GPU sleep, so the timing is the kernels' own time and not the CPU's
    launch rate (the runtime replays CUDA graphs, where launches cost nothing); the best of `trials` counts.
    """
    times = {}
    for name, fn in candidates.items():
        try:
            fn()
            torch.cuda.synchronize()
        except Exception as exc:  # a Triton config that does not fit this GPU's shared memory is not a choice
            log.debug("candidate %s failed: %s", name, exc)
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
    return times


class GemmChoices:
    """The measured GEMM per `GemmKey` of one runtime (shared by its layers); `unsaved` is True when a choice
    was added since the last `save`."""

    def __init__(self, choices: Iterable[GemmChoice] = ()):
        self._choices = {c.key: c for c in choices}
        self.unsaved = False

    def __len__(self) -> int:
        return len(self._choices)

    def get(self, key: GemmKey) -> str | None:
        choice = self._choices.get(key)
        return None if choice is None else choice.impl

    def records(self) -> list[GemmChoice]:
        return sorted(self._choices.values(), key=lambda c: dataclasses.astuple(c.key))

    def add(self, choice: GemmChoice) -> None:
        self._choices[choice.key] = choice
        self.unsaved = True

    def measure(self, key: GemmKey, candidates: dict[str, Callable[[], torch.Tensor]], reps: int = 10,
                trials: int = 3) -> str:
        """Time the candidates (`time_candidates`), record the fastest for `key` and return its name."""
        times = time_candidates(candidates, reps, trials)
        if not times:
            raise RuntimeError(f"no GEMM candidate ran for {key}: {list(candidates)}")
        best = min(times, key=times.get)
        log.debug("%s: %s", key, {n: round(t, 4) for n, t in sorted(times.items(), key=lambda kv: kv[1])})
        self.add(GemmChoice(key, best, tuple(sorted(times.items()))))
        return best

    def clear(self) -> None:
        self._choices.clear()
        self.unsaved = False

    def load(self, path: str | Path) -> bool:
        """Add the choices of a cache file; a missing file is skipped, an unreadable or old-format one is ignored
        with a warning (its shapes are measured again). Returns whether the file was read."""
        path = Path(path)
        if not path.is_file():
            return False
        try:
            data = json.loads(path.read_text())
            if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION or "choices" not in data:
                raise ValueError(f"not a version {FORMAT_VERSION} GEMM choice file (an older bonsai wrote it?)")
            if not isinstance(data["choices"], list):
                raise ValueError(f"'choices' must be a list, got {type(data['choices']).__name__}")
            loaded = []
            for i, entry in enumerate(data["choices"]):
                try:
                    loaded.append(GemmChoice.from_json(entry))
                except ValueError as exc:
                    raise ValueError(f"choices[{i}]: {exc}") from None
        except (OSError, ValueError) as exc:
            log.warning("ignoring GEMM choice cache %s: %s", path, exc)
            return False
        self._choices.update({c.key: c for c in loaded})
        return True

    def save(self, path: str | Path) -> None:
        """Write every choice to `path` (atomically: a reader never sees half a file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        data = {"version": FORMAT_VERSION, "choices": [c.to_json() for c in self.records()]}
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
        self.unsaved = False


def cache_path(directory: str | Path | None = None) -> Path:
    """Per-GPU-model table, e.g. ~/.cache/bonsai/gemm-NVIDIA_H100_80GB_HBM3.json (next to gemlite's)."""
    from .gemlite import gpu_cache_file

    return gpu_cache_file("gemm", directory)
