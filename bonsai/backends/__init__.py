"""Backends: which runtime renders, chosen explicitly or resolved from "auto" in one place."""

from __future__ import annotations

import enum
import importlib.util
import logging
import os
import platform
import re

from ..errors import BonsaiValueError
from ..params import dtype_name

log = logging.getLogger(__name__)


class Backend(str, enum.Enum):
    TORCH = "torch"
    CUDA = "cuda"
    MLX = "mlx"


def _apple_silicon() -> bool:
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def _torch_build_has_cuda() -> bool:
    """Whether the installed torch is a CUDA build, read from torch/version.py without importing torch (~1 s)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        with open(os.path.join(spec.submodule_search_locations[0], "version.py")) as f:
            text = f.read()
    except OSError:
        return True  # unknown: let torch itself decide
    match = re.search(r"^cuda\b.*=\s*(.+)$", text, re.M)
    return match is None or match.group(1).strip() not in ("None", "'None'")


def _maybe_cuda() -> bool:
    """False when CUDA surely is not there (a CPU torch build, no NVIDIA device node), without importing torch."""
    return _torch_build_has_cuda() and (platform.system() != "Linux" or os.path.exists("/dev/nvidiactl"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_available(backend: "Backend", device: str | None = None) -> None:
    """Cheap checks that `backend` (and a torch `device`) can run here, before anything is loaded or downloaded."""
    wants_cuda = backend is Backend.CUDA or (device is not None and str(device).startswith("cuda"))
    if device is not None and not re.fullmatch(r"(cpu|mps|cuda)(:\d+)?", str(device)):
        raise BonsaiValueError(f"device must look like cpu, cuda, cuda:1 or mps, got {device!r}")
    if backend is Backend.MLX and device is not None:
        raise BonsaiValueError("device applies to the torch and cuda backends; MLX picks its own device")
    if wants_cuda:
        what = "backend='cuda'" if backend is Backend.CUDA else f"device={device!r}"
        if not _torch_build_has_cuda():
            raise BonsaiValueError(f"{what} needs a CUDA build of torch; this one is CPU-only "
                                   "(see README: Install, NVIDIA GPU)")
        if not _maybe_cuda():
            raise BonsaiValueError(f"{what}: no NVIDIA GPU on this machine (/dev/nvidiactl is missing)")
    if backend is Backend.MLX and importlib.util.find_spec("mlx") is None:
        raise BonsaiValueError("backend='mlx' needs MLX: pip install -e '.[mlx]'  (Linux: pip install 'mlx[cpu]')")


def resolve(name: str | Backend = "auto") -> Backend:
    """"auto" -> cuda when a CUDA device is present, mlx on Apple Silicon with mlx installed, else torch."""
    if isinstance(name, Backend):
        return name
    if name != "auto":
        try:
            return Backend(name)
        except ValueError:
            raise BonsaiValueError(f"backend must be one of auto, {', '.join(b.value for b in Backend)}; got "
                                   f"{name!r}") from None
    if _maybe_cuda() and _cuda_available():
        choice = Backend.CUDA
    elif _apple_silicon() and importlib.util.find_spec("mlx") is not None:
        choice = Backend.MLX
    else:
        choice = Backend.TORCH
    log.info("backend auto -> %s", choice.value)
    return choice


def load_runtime(backend: Backend, folder, device=None, dtype=None, **options):
    """Load the runtime of `backend` from a local repo folder (see docs/design.md for the Runtime contract)."""
    check_available(backend, device)
    name = dtype_name(dtype)
    if backend is Backend.MLX:
        from .mlx.runtime import MLXRuntime

        return MLXRuntime.load(folder, dtype=name, **options)
    import torch

    dtype = None if name is None else getattr(torch, name)
    if backend is Backend.TORCH:
        from .torch.runtime import TorchRuntime

        return TorchRuntime.load(folder, device=device, dtype=dtype, **options)
    if not torch.cuda.is_available():
        raise BonsaiValueError("backend='cuda' needs a CUDA device; torch.cuda.is_available() is False")
    from .cuda.runtime import CudaRuntime

    return CudaRuntime.load(folder, device=device, dtype=dtype, **options)
