"""Image size rules, the aspect-ratio helper and the style presets."""

from __future__ import annotations

import math
import numbers

from .errors import BonsaiValueError

MULTIPLE = 16  # VAE factor 8 x 2x2 patch
MIN_SIZE, MAX_SIZE = 32, 4096

# Prompt suffixes for the 10 styles of the Bonsai Image seed blog.
STYLES = {
    "comic": "in the style of a comic book panel, bold ink outlines, flat colors, halftone shading",
    "illustration": "as a detailed digital illustration, soft lighting, rich colors",
    "cartoon": "as a cartoon, simple shapes, thick outlines, bright cheerful colors",
    "vector": "as a flat vector illustration, clean geometric shapes, solid colors",
    "minimalist-vector": "as a minimalist vector graphic, very few shapes, limited palette, lots of negative space",
    "sketch": "as a pencil sketch, loose hand-drawn lines, cross-hatching, on white paper",
    "stickman": "as a stick figure drawing, simple black lines on a white background",
    "infographic": "as a clean infographic, labeled sections, icons, flat design",
    "typography": "as a typographic poster, bold expressive lettering as the main element",
    "caricature": "as a caricature, exaggerated features, humorous expressive style",
}


def check_size(width: int, height: int) -> None:
    for name, v in (("width", width), ("height", height)):
        if not isinstance(v, numbers.Integral) or isinstance(v, bool):
            raise BonsaiValueError(f"{name} must be an integer number of pixels, got {v!r}")
        if v % MULTIPLE:
            raise BonsaiValueError(f"{name} must be a multiple of {MULTIPLE}, got {v} (nearest: {snap(v)})")
        if not MIN_SIZE <= v <= MAX_SIZE:
            raise BonsaiValueError(f"{name} must be in [{MIN_SIZE}, {MAX_SIZE}], got {v}")


def snap(v: float) -> int:
    return max(MULTIPLE, int(v / MULTIPLE + 0.5) * MULTIPLE)  # half up, not to even


def parse_aspect(aspect: str) -> tuple[float, float]:
    try:
        w, h = (float(p) for p in str(aspect).replace("x", ":").split(":"))
    except ValueError:
        raise BonsaiValueError(f"aspect must look like '16:9', got {aspect!r}") from None
    if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
        raise BonsaiValueError(f"aspect must have finite positive sides, got {aspect!r}")
    if max(w, h) / min(w, h) > MAX_SIZE / MIN_SIZE:
        raise BonsaiValueError(f"aspect {aspect!r} is more extreme than {MAX_SIZE}:{MIN_SIZE}")
    return w, h


def size_from_aspect(aspect: str, long_edge: int = 1024) -> tuple[int, int]:
    """(width, height) with the given aspect, the longer side `long_edge`, both snapped to multiples of 16."""
    if not isinstance(long_edge, numbers.Integral) or isinstance(long_edge, bool) or not (
            MIN_SIZE <= long_edge <= MAX_SIZE):
        raise BonsaiValueError(f"long_edge must be an integer in [{MIN_SIZE}, {MAX_SIZE}], got {long_edge!r}")
    w, h = parse_aspect(aspect)
    scale = int(long_edge) / max(w, h)
    return snap(w * scale), snap(h * scale)


def parse_size(size: str) -> tuple[int, int]:
    """'1024x768' -> (1024, 768)."""
    try:
        w, h = (int(p) for p in str(size).lower().split("x"))
    except ValueError:
        raise BonsaiValueError(f"size must look like 1024x768, got {size!r}") from None
    return w, h


def check_style(style: str | None) -> str | None:
    if style is not None and (not isinstance(style, str) or style not in STYLES):
        raise BonsaiValueError(f"style must be one of {', '.join(STYLES)}, got {style!r}")
    return style


def apply_style(prompt: str, style: str | None) -> str:
    if check_style(style) is None:
        return prompt
    return f"{prompt.rstrip().rstrip('.')}, {STYLES[style]}"
