"""Flow-match Euler sigmas with FLUX.2 [klein]'s empirical, resolution-dependent shift.

Float32 arithmetic in the same order as diffusers' Flux2KleinPipeline + FlowMatchEulerDiscreteScheduler, so the
schedule is bit-identical to the reference one.
"""

from __future__ import annotations

import math

import numpy as np

from .config import SchedulerConfig


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
