"""bonsai.tiling: tile placement and blend weights, shared by the torch and MLX tiled VAE decodes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bonsai.errors import BonsaiValueError
from bonsai.tiling import edge_weights, tile_plan, tile_starts


def test_tile_starts_by_hand():
    assert tile_starts(4, 8, 2) == [0]  # smaller than a tile: one tile
    assert tile_starts(10, 4, 1) == [0, 3, 6]  # stride 3 ends flush
    assert tile_starts(11, 4, 1) == [0, 3, 6, 7]  # one more tile, flush with the edge
    assert tile_starts(20, 10, 0) == [0, 10]


@pytest.mark.parametrize("blend", ["linear", "cosine"])
def test_edge_weights_against_float64_ramps(blend):
    ramp, length = 12, 40
    r = (np.arange(ramp) + 0.5) / ramp
    want = r if blend == "linear" else (1 - np.cos(math.pi * r)) / 2
    w = edge_weights(length, ramp, lead=True, trail=True, blend=blend)
    assert w.dtype == np.float32
    np.testing.assert_allclose(w[:ramp], want, rtol=0, atol=1e-7)
    np.testing.assert_allclose(w[-ramp:], want[::-1], rtol=0, atol=1e-7)
    assert (w[ramp:-ramp] == 1).all()
    assert (edge_weights(length, ramp, False, False, blend) == 1).all()


def test_plan_covers_the_output_and_its_total_is_the_weight_sum():
    h, w, scale = 11, 9, 8
    plan = tile_plan(h, w, tile=4, overlap=1, scale=scale)
    assert len(plan.tiles) == len(tile_starts(h, 4, 1)) * len(tile_starts(w, 4, 1)) == 4 * 3
    cover = np.zeros((h * scale, w * scale), np.float64)
    for t in plan.tiles:
        rows, cols = t.out
        assert t.weight.shape == (rows.stop - rows.start, cols.stop - cols.start)
        assert (rows.start, cols.start) == (t.latent[0].start * scale, t.latent[1].start * scale)
        assert t.weight.min() > 0
        cover[rows, cols] += t.weight
    assert plan.total.shape == (h * scale, w * scale) and plan.total.min() > 0
    np.testing.assert_allclose(plan.total, cover, rtol=1e-6)


def test_plan_rejects_bad_arguments():
    with pytest.raises(BonsaiValueError, match="blend must be"):
        tile_plan(8, 8, 4, 1, 8, "gauss")
    with pytest.raises(BonsaiValueError, match=r"tile overlap must be in \[0, tile=4\), got 4"):
        tile_plan(8, 8, 4, 4, 8)


def test_torch_and_mlx_blend_the_same_tiles():
    """Both backends blend with the same plan: the same per-tile function gives the same result to float32 rounding."""
    mx = pytest.importorskip("mlx.core")
    from bonsai.backends.mlx.vae import blend_tiles as blend_mlx
    from bonsai.backends.torch.vae import blend_tiles as blend_torch

    z = np.random.default_rng(0).standard_normal((1, 2, 11, 9)).astype(np.float32)  # NCHW
    # not local: each tile adds its own mean, so the blend weights show in the result
    fn_torch = lambda t: (t + t.mean()).repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)  # noqa: E731
    fn_mlx = lambda t: mx.repeat(mx.repeat(t + t.mean(), 4, axis=1), 4, axis=2)  # noqa: E731
    want = blend_torch(fn_torch, torch.from_numpy(z), 4, 1, 4, "cosine").numpy()
    got = np.array(blend_mlx(fn_mlx, mx.array(z.transpose(0, 2, 3, 1)), 4, 1, 4, "cosine")).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6)
    untiled = fn_torch(torch.from_numpy(z)).numpy()
    assert np.abs(want - untiled).max() > 1e-3  # the tiles really differ from one pass
