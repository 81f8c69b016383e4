"""CUDA runtime: the torch runtime on device "cuda" with CUDA low-bit linears (our fast path or gemlite)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..torch.runtime import TorchRuntime
from .gemlite import cache_dir  # noqa: F401  (re-exported)
from .linear import LINEARS, make_linear_factory  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def _released_autotune_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("transformer*/gemlite_autotune.json")) + sorted(folder.glob("gemlite_autotune.json"))


class CudaRuntime(TorchRuntime):
    """TorchRuntime with CUDA linears; attention goes through torch SDPA (flash / cuDNN kernels)."""

    name = "cuda"

    @classmethod
    def load(cls, folder, device=None, dtype=None, linear: str = "auto", keep_text_encoder=False, **options):
        if not torch.cuda.is_available():
            raise RuntimeError("CudaRuntime needs a CUDA device; torch.cuda.is_available() is False")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise ValueError(f"CudaRuntime runs on a cuda device, got {device}")
        dtype = dtype or torch.bfloat16
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        folder = Path(folder)
        make_linear = make_linear_factory(linear)
        autotune = None
        if linear == "gemlite":
            from . import gemlite

            # Released tuned configs first, then ours (ours win: they were measured on this GPU model).
            for f in _released_autotune_files(folder):
                gemlite.load_autotune(f)
            autotune = gemlite.autotune_cache_path()
            gemlite.load_autotune(autotune)
        t0 = time.perf_counter()
        rt = super().load(folder, device=device, dtype=dtype, make_linear=make_linear,
                          keep_text_encoder=keep_text_encoder, **options)
        rt.linear = "fast" if linear == "auto" else linear
        rt.autotune_file = autotune
        rt.load_seconds = time.perf_counter() - t0
        return rt

    @torch.inference_mode()
    def warmup(self, sizes=((1024, 1024),), text_tokens: int = 512) -> dict[tuple[int, int], float]:
        """Run one denoise step per (height, width) so Triton JIT / autotuning happen now, not on the first
        image; persists gemlite's tuned configs. Returns seconds per size (the time-to-first-step cost)."""
        from ... import latents

        cfg = self.transformer.config
        out = {}
        for height, width in sizes:
            h, w = latents.latent_size(height, width)
            noise = torch.zeros(1, h * w, cfg.in_channels)
            feats = torch.zeros(1, text_tokens, cfg.joint_attention_dim, device=self.device, dtype=self.dtype)
            t0 = time.perf_counter()
            self.denoise(noise, feats, [1.0, 0.0], latents.img_ids(h, w), latents.txt_ids(text_tokens))
            torch.cuda.synchronize(self.device)
            out[(height, width)] = time.perf_counter() - t0
        if getattr(self, "linear", None) == "gemlite" and self.autotune_file is not None:
            from . import gemlite

            gemlite.save_autotune(self.autotune_file)
        return out


