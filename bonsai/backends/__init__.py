"""Backends: which runtime renders, chosen explicitly or resolved from "auto" in one place."""

from __future__ import annotations

import enum
import importlib.util
import logging
import platform

log = logging.getLogger(__name__)


class Backend(str, enum.Enum):
    TORCH = "torch"
    CUDA = "cuda"
    MLX = "mlx"


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def resolve(name: str | Backend = "auto") -> Backend:
    """"auto" -> cuda when a CUDA device is present, mlx on Apple Silicon with mlx installed, else torch."""
    if isinstance(name, Backend):
        return name
    if name != "auto":
        try:
            return Backend(name)
        except ValueError:
            raise ValueError(f"backend must be one of auto, {', '.join(b.value for b in Backend)}; got {name!r}") from None
    import torch

    if torch.cuda.is_available():
        choice = Backend.CUDA
    elif _apple_silicon() and importlib.util.find_spec("mlx") is not None:
        choice = Backend.MLX
    else:
        choice = Backend.TORCH
    log.info("backend auto -> %s", choice.value)
    return choice


def load_runtime(backend: Backend, folder, device=None, dtype=None, **options):
    """Load the runtime of `backend` from a local repo folder (see docs/design.md for the Runtime contract)."""
    if backend is Backend.TORCH:
        from .torch.runtime import TorchRuntime

        return TorchRuntime.load(folder, device=device, dtype=dtype, **options)
    if backend is Backend.CUDA:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("backend='cuda' needs a CUDA device; torch.cuda.is_available() is False")
        from .cuda.runtime import CudaRuntime

        return CudaRuntime.load(folder, device=device, dtype=dtype, **options)
    if backend is Backend.MLX:
        if importlib.util.find_spec("mlx") is None:
            raise ImportError("backend='mlx' needs MLX: pip install -e .[mlx]  (on Linux: pip install 'mlx[cpu]')")
        from .mlx.runtime import MLXRuntime

        return MLXRuntime.load(folder, dtype=dtype, **options)
    raise ValueError(f"unknown backend {backend!r}")
