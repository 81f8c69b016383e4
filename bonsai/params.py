"""Render arguments, checked in one place for the Python API, the CLI, batch lines and the server.

`check(...)` turns user arguments into a frozen `Request` or raises a one-line BonsaiValueError naming the argument,
before any model is loaded or downloaded.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass

from . import sizes
from .errors import BonsaiValueError

MAX_SEED = 2**32
MAX_STEPS = 50  # the distilled model is made for 4; more only costs time
MAX_BATCH = 64
MAX_PROMPTS = 256
MAX_PROMPT_CHARS = 4000  # the text encoder reads at most 512 tokens; longer prompts are refused after tokenizing
DEFAULT_SIZE = 512


@dataclass(frozen=True)
class Request:
    """One call's checked arguments: image i renders prompts[i] (style applied) with seeds[i]."""

    prompts: tuple[str, ...]
    width: int
    height: int
    steps: int
    seeds: tuple[int, ...]
    style: str | None = None
    batch_size: int = 1

    @property
    def full_prompts(self) -> tuple[str, ...]:
        """The prompts the text encoder reads (style suffix appended)."""
        return tuple(sizes.apply_style(p, self.style) for p in self.prompts)


def integer(value, name: str, lo: int | None = None, hi: int | None = None) -> int:
    """An int (numpy integers included, bools not) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BonsaiValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise BonsaiValueError(f"{name} must be in {bounds}, got {value}")
    return value


def prompts(prompt) -> tuple[str, ...]:
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, (list, tuple)) or not items:
        raise BonsaiValueError(f"prompt must be a non-empty string or a non-empty list of strings, got {prompt!r}")
    if len(items) > MAX_PROMPTS:
        raise BonsaiValueError(f"prompt: at most {MAX_PROMPTS} prompts per call, got {len(items)}")
    for i, p in enumerate(items):
        where = "prompt" if isinstance(prompt, str) else f"prompt[{i}]"
        if not isinstance(p, str):
            raise BonsaiValueError(f"{where} must be a string, got {type(p).__name__}")
        if not p.strip():
            raise BonsaiValueError(f"{where} is empty")
        if len(p) > MAX_PROMPT_CHARS:
            raise BonsaiValueError(f"{where} has {len(p)} characters; at most {MAX_PROMPT_CHARS}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:
            raise BonsaiValueError(f"{where} is not valid text (undecodable bytes); pass UTF-8") from None
    return tuple(items)


def size(width=None, height=None, aspect=None, long_edge=None) -> tuple[int, int]:
    """(width, height) from width/height (default 512 each) or from aspect ("16:9") and long_edge (default 1024)."""
    if aspect is not None or long_edge is not None:
        if width is not None or height is not None:
            raise BonsaiValueError("pass either width/height or aspect/long_edge, not both")
        width, height = sizes.size_from_aspect("1:1" if aspect is None else aspect,
                                               1024 if long_edge is None else long_edge)
    width = DEFAULT_SIZE if width is None else integer(width, "width")
    height = DEFAULT_SIZE if height is None else integer(height, "height")
    sizes.check_size(width, height)
    return width, height


def seeds(seed, n: int) -> tuple[int, ...]:
    """None -> n random consecutive seeds; an int -> seed, seed + 1, ...; a list -> checked as given."""
    if seed is None:
        base = secrets.randbelow(MAX_SEED - n)
        return tuple(base + i for i in range(n))
    if isinstance(seed, (list, tuple)):
        if len(seed) != n:
            raise BonsaiValueError(f"seed: got {len(seed)} seeds for {n} prompts")
        return tuple(integer(s, f"seed[{i}]", 0, MAX_SEED - 1) for i, s in enumerate(seed))
    first = integer(seed, "seed", 0, MAX_SEED - n)
    return tuple(first + i for i in range(n))


def check(prompt, width=None, height=None, steps=4, seed=None, style=None, aspect=None, long_edge=None,
          batch_size=1) -> Request:
    """Every render argument checked; raises BonsaiValueError naming the first bad one."""
    texts = prompts(prompt)
    w, h = size(width, height, aspect, long_edge)
    return Request(prompts=texts, width=w, height=h, steps=integer(steps, "steps", 1, MAX_STEPS),
                   seeds=seeds(seed, len(texts)), style=sizes.check_style(style),
                   batch_size=integer(batch_size, "batch_size", 1, MAX_BATCH))


DTYPES = ("float32", "bfloat16", "float16")


def dtype_name(dtype) -> str | None:
    """None, "bfloat16", torch.bfloat16 or mx.bfloat16 -> "bfloat16" (likewise float32, float16)."""
    if dtype is None:
        return None
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPES:
        raise BonsaiValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def finite(value, name: str, lo: float, hi: float) -> float:
    """A real number in [lo, hi] (numpy floats included; NaN and inf refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise BonsaiValueError(f"{name} must be a finite number, got {value!r}")
    if not lo <= float(value) <= hi:
        raise BonsaiValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return float(value)
