"""CUDA runtime: the torch runtime on a CUDA device with CUDA low-bit linears (our fast path or gemlite)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..torch.runtime import TorchRuntime
from .linear import LINEARS, make_linear_factory, release_scratch

log = logging.getLogger(__name__)

__all__ = ["CudaRuntime", "LINEARS"]


def _gemlite_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("transformer-gemlite-*") if p.is_dir())


def _load_gemlite_transformer(folder: Path, device, dtype):
    """A released gemlite repo straight into gemlite layers: the stored W_q/scales/zeros, no repacking."""
    from ... import weights
    from ..torch.transformer import load_transformer
    from . import gemlite

    config, quant_config, state = weights.read_gemlite_state(folder)
    packing = int((quant_config or {}).get("packing_bitwidth", 8))
    tensors = gemlite.split_state(state)
    for key, value in tensors.items():
        if isinstance(value, gemlite.GemliteState):
            width = value.packed.element_size() * 8
            if width != packing:
                raise ValueError(f"{folder}: quantization_config packing_bitwidth={packing} but {key[:-7]}.W_q is "
                                 f"{value.packed.dtype} ({width}-bit packing)")
    return load_transformer(tensors, config, device=device, dtype=dtype, make_linear=gemlite.make_gemlite_linear)


class CudaRuntime(TorchRuntime):
    """TorchRuntime with CUDA linears; attention goes through torch SDPA (flash / cuDNN kernels on Hopper)."""

    name = "cuda"

    @classmethod
    def load(cls, folder, device=None, dtype=None, linear: str = "auto", keep_text_encoder: bool = False,
             autotune_file: str | Path | None = None, **options):
        """linear: "auto" (= "fast": Triton expand + cuBLAS), "fast" or "gemlite"; dtype bf16 (default) or fp16.

        With "gemlite", a released gemlite repo loads as stored and its `gemlite_autotune.json` is honoured;
        tuned configs are persisted per GPU model under the user cache (`autotune_file` overrides the path).
        """
        if not torch.cuda.is_available():
            raise RuntimeError("CudaRuntime needs a CUDA device; torch.cuda.is_available() is False")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise ValueError(f"CudaRuntime runs on a cuda device, got {device}")
        dtype = dtype or torch.bfloat16
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        if linear not in LINEARS:
            raise ValueError(f"linear must be one of {LINEARS}, got {linear!r}")
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        t0 = time.perf_counter()
        tune = None
        if linear == "gemlite":
            from . import gemlite

            # Released tuned configs first, then ours on top (ours were measured on this GPU model).
            for f in sorted(folder.glob("transformer*/gemlite_autotune.json")):
                gemlite.load_autotune(f)
            tune = Path(autotune_file) if autotune_file else gemlite.autotune_cache_path()
            gemlite.load_autotune(tune)
        if linear == "gemlite" and _gemlite_dirs(folder):
            from ... import weights
            from ..torch.vae import load_vae_decoder

            transformer = _load_gemlite_transformer(folder, device, dtype)
            vae_config, vae_state = weights.read_vae(folder)
            vae = load_vae_decoder(vae_state, vae_config, device=device, dtype=dtype)
            rt = cls(folder, transformer, vae, device, dtype, options.get("layers", _default_layers()),
                     keep_text_encoder)
        else:
            rt = super().load(folder, device=device, dtype=dtype, make_linear=make_linear_factory(linear),
                              keep_text_encoder=keep_text_encoder, **options)
        rt.linear = "fast" if linear == "auto" else linear
        rt.autotune_file = tune
        torch.cuda.synchronize(device)
        rt.load_seconds = time.perf_counter() - t0
        rt.resident_gb = torch.cuda.memory_allocated(device) / 1e9
        return rt

    @torch.inference_mode()
    def warmup(self, sizes=((1024, 1024),), text_tokens: int = 512) -> dict[tuple[int, int], float]:
        """One denoise step per (height, width), so Triton JIT and gemlite autotuning happen now rather than in the
        first image; persists gemlite's tuned configs. Returns seconds per size."""
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

    def memory_report(self) -> dict[str, float]:
        """GPU memory in GB: resident after load, allocated now, and the peak since the last reset."""
        return dict(resident_gb=getattr(self, "resident_gb", float("nan")),
                    allocated_gb=torch.cuda.memory_allocated(self.device) / 1e9,
                    peak_gb=torch.cuda.max_memory_allocated(self.device) / 1e9)

    def release(self) -> None:
        """Drop the shared expand scratch (re-made on the next call) and cached allocator blocks."""
        release_scratch()
        torch.cuda.empty_cache()


def _default_layers():
    from ...prompt import FEATURE_LAYERS

    return FEATURE_LAYERS
