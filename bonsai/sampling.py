"""The flow-match Euler sampler, written once for every backend.

Noise levels are sigma in [0, 1] (1 = pure noise); `bonsai.scheduler.sigmas` makes the schedule. The model call is
the backend's `velocity(x, timestep, cond)`; the step arithmetic and the timestep convention live here.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch

TIMESTEP_SCALE = 1000  # the model embeds sigma * 1000


def model_timestep(sigma: float, dtype: torch.dtype) -> float:
    """The `timestep` the reference pipeline passes for noise level sigma: dtype(sigma * 1000) / 1000, in dtype.

    The model multiplies it by 1000 again; both roundings to the model dtype are part of the reference numerics.
    Returned as a Python float, which every backend represents exactly in `dtype`.
    """
    t = torch.tensor(sigma, dtype=torch.float32) * TIMESTEP_SCALE
    return float(t.to(dtype) / TIMESTEP_SCALE)


def euler_step(x, v, dt: float):
    """x + dt * v in float32, rounded back to x's dtype, as FlowMatchEulerDiscreteScheduler.step does.

    x, v: torch tensors or mx arrays of one shape; dt: a float32 value.
    """
    if isinstance(x, torch.Tensor):
        return (x.float() + dt * v.float()).to(x.dtype)
    import mlx.core as mx

    return (x.astype(mx.float32) + dt * v.astype(mx.float32)).astype(x.dtype)


def sample(velocity: Callable, x, sigmas: list[float], dtype: torch.dtype, start: int = 0) -> Iterator[tuple[int, object]]:
    """Run the Euler steps sigmas[start] -> ... -> sigmas[-1] from latents x; yield (step index, latents) after each.

    velocity(x, timestep) -> v, with timestep as `model_timestep` gives it for the model dtype `dtype`.
    A consumer that stops iterating stops the render after the current step.
    """
    if len(sigmas) < 2 or sigmas[-1] != 0.0:
        raise ValueError(f"sigmas must hold at least two values and end with 0.0, got {sigmas}")
    sig = np.asarray(sigmas, dtype=np.float32)
    for i in range(start, len(sig) - 1):
        v = velocity(x, model_timestep(float(sig[i]), dtype))
        x = euler_step(x, v, float(sig[i + 1] - sig[i]))  # the difference in float32, as the reference
        yield i, x
