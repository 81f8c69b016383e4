"""Tiled VAE decoding, backend-free: where the overlapping tiles go and how their outputs are cross-faded.

The torch and MLX decoders take a `TilePlan` and only run the tiles and sum `piece * weight` (their own arrays).
Weights are float32 numpy; the normaliser `total` is their sum, accumulated in the order the tiles are listed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import BonsaiValueError

BLENDS = ("linear", "cosine")


@dataclass(frozen=True, eq=False)
class Tile:
    """One tile: its latent window, the output window it writes, and its blend weights [out rows, out cols]."""

    latent: tuple[slice, slice]  # (rows, cols) of the latent input
    out: tuple[slice, slice]  # (rows, cols) of the decoded output, `scale` times the latent window
    weight: np.ndarray  # float32 [rows, cols] of the output window


@dataclass(frozen=True, eq=False)
class TilePlan:
    tiles: list[Tile]
    total: np.ndarray  # float32 [h * scale, w * scale]: the summed weights, the blend's normaliser


def tile_starts(n: int, tile: int, overlap: int) -> list[int]:
    """Starts of tiles of `tile` pixels covering [0, n), stepping by tile - overlap."""
    if n <= tile:
        return [0]
    starts = list(range(0, n - tile + 1, tile - overlap))
    if starts[-1] + tile < n:
        starts.append(n - tile)  # last tile flush with the edge; it overlaps its neighbour by more
    return starts


def edge_weights(length: int, ramp: int, lead: bool, trail: bool, blend: str) -> np.ndarray:
    """[length] float32 weights rising over `ramp` pixels at each edge shared with a neighbouring tile."""
    w = np.ones(length, np.float32)
    ramp = min(ramp, length)
    if ramp > 0:
        r = (np.arange(ramp, dtype=np.float32) + 0.5) / ramp  # strictly inside (0, 1): no zero weights
        r = r if blend == "linear" else 0.5 - 0.5 * np.cos(math.pi * r)
        if lead:
            w[:ramp] = np.minimum(w[:ramp], r)
        if trail:
            w[length - ramp:] = np.minimum(w[length - ramp:], r[::-1])
    return w


def tile_plan(h: int, w: int, tile: int, overlap: int, scale: int, blend: str = "cosine") -> TilePlan:
    """Tiles of `tile` latent pixels sharing `overlap` pixels over an [h, w] latent decoded `scale` times larger.

    Overlaps are cross-faded with a linear or cosine ramp; dividing the weighted sum by `total` reproduces a local
    function exactly.
    """
    if blend not in BLENDS:
        raise BonsaiValueError(f"blend must be 'linear' or 'cosine', got {blend!r}")
    if not 0 <= overlap < tile:
        raise BonsaiValueError(f"tile overlap must be in [0, tile={tile}), got {overlap}")
    tiles, total = [], np.zeros((h * scale, w * scale), np.float32)
    for y0 in tile_starts(h, tile, overlap):
        for x0 in tile_starts(w, tile, overlap):
            th, tw = min(tile, h - y0) * scale, min(tile, w - x0) * scale
            wy = edge_weights(th, overlap * scale, y0 > 0, y0 + tile < h, blend)
            wx = edge_weights(tw, overlap * scale, x0 > 0, x0 + tile < w, blend)
            out = (slice(y0 * scale, y0 * scale + th), slice(x0 * scale, x0 * scale + tw))
            tiles.append(Tile((slice(y0, y0 + tile), slice(x0, x0 + tile)), out, wy[:, None] * wx[None, :]))
            total[out] += tiles[-1].weight
    return TilePlan(tiles, total)
