"""Flow-match Euler sigmas with FLUX.2 [klein]'s empirical, resolution-dependent shift.

Float32 arithmetic in the same order as diffusers' Flux2KleinPipeline + FlowMatchEulerDiscreteScheduler, so the
schedule is bit-identical to the reference one.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .config import SchedulerConfig
from .errors import BonsaiValueError


def empirical_mu(image_seq_len: int, steps: int) -> float:
    """The shift exponent fitted for klein: linear in tokens, interpolated between 10 and 200 steps."""
    a1, b1 = 8.73809524e-05, 1.89833333
    a2, b2 = 0.00016927, 0.45666666
    if image_seq_len > 4300:
        return float(a2 * image_seq_len + b2)
    m_200 = a2 * image_seq_len + b2
    m_10 = a1 * image_seq_len + b1
    a = (m_200 - m_10) / 190.0
    return float(a * steps + (m_200 - 200.0 * a))


def sigmas(steps: int, image_seq_len: int, config: SchedulerConfig | None = None) -> list[float]:
    """steps + 1 noise levels, descending from 1.0, ending with 0.0 (float32 values as Python floats)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    config = config or SchedulerConfig()
    t = np.linspace(1.0, 1 / steps, steps).astype(np.float32)
    if config.use_dynamic_shifting:
        e = math.exp(empirical_mu(image_seq_len, steps))
        s = e / (e + (1 / t - 1))  # exponential time shift with exponent 1
    else:
        s = config.shift * t / (1 + (config.shift - 1) * t)
    return [float(v) for v in s.astype(np.float32)] + [0.0]


def start_step(steps: int, strength: float) -> int:
    """Image-to-image: the index of the first of `steps` steps to run for `strength` in (0, 1].

    diffusers' get_timesteps (Flux2KleinInpaintPipeline, FluxImg2ImgPipeline), float arithmetic included:
    int(steps - min(steps * strength, steps)). strength=1.0 gives 0 (plain text-to-image); run sigmas[start:].
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise BonsaiValueError(f"steps must be a positive integer, got {steps!r}")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0.0 <= strength <= 1.0:
        raise BonsaiValueError(f"strength must be a number in [0, 1], got {strength!r}")
    start = int(max(steps - min(steps * strength, steps), 0))
    if start >= steps:
        raise BonsaiValueError(f"strength={strength} leaves no step of {steps}; use a larger strength or more steps")
    return start


def noise_to(x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """Flow-matching forward process: sigma * noise + (1 - sigma) * x0, in x0's dtype.

    FlowMatchEulerDiscreteScheduler.scale_noise: the float32 sigma is cast to the sample dtype first.
    sigma = 1.0 returns the noise exactly.
    """
    if x0.shape != noise.shape:
        raise BonsaiValueError(f"noise {tuple(noise.shape)} must have the shape of the latents {tuple(x0.shape)}")
    s = torch.tensor(sigma, dtype=torch.float32).to(x0.device, x0.dtype)
    return s * noise.to(x0.device, x0.dtype) + (1.0 - s) * x0
