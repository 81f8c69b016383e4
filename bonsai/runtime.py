"""The contract between `bonsai.Pipeline` and a backend. Everything else (tokens, noise, ids, schedule, sampler,
batching, metadata) is shared code; a backend implements the model calls below and nothing more."""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch


class Runtime(Protocol):
    """One backend's loaded models. Arrays are the backend's own (torch tensors on its device, or mx arrays)."""

    name: str  # "torch" | "cuda" | "mlx"
    dtype: torch.dtype  # the model dtype; the seed's noise is drawn in it, as the reference pipeline does

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        """int64 [B, S] token ids and mask (torch CPU) -> prompt features [B, S, joint_attention_dim]."""

    def latents(self, noise: torch.Tensor):
        """Packed noise [B, N_img, 128] (torch CPU, in `dtype`) -> the backend's latents array in the model dtype."""

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image [1, 3, H, W] in [-1, 1] (torch CPU) -> VAE latents, normalised and packed: [1, H*W/256, 128]
        (torch CPU float32), for reference images and image-to-image."""

    def set_adapters(self, adapters: Sequence) -> None:
        """LoRA branches beside the linears for exactly these (bonsai.lora.Lora, strength) pairs; [] removes all."""

    def condition(self, features: Sequence, img_ids: torch.Tensor, txt_ids: torch.Tensor, refs=None):
        """Per-image features (each [1, S, D], from `encode`), position ids and optional reference images
        (tokens [1, M, 128] from `encode_image`, ids [M, 4]) -> what `velocity` needs for one batch: features
        stacked on the device, RoPE tables (and, on CUDA, the captured graph for these shapes)."""

    def velocity(self, x, timestep: float, cond):
        """The transformer: latents [B, N_img, 128] at `timestep` (see `bonsai.sampling.model_timestep`) -> v."""

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents [B, N_img, 128] -> uint8 images [B, height, width, 3] (numpy)."""

    def synchronize(self) -> None:
        """Wait for the device's queued work (stage times in `Report` are wall times)."""

    def reset_peak_memory(self) -> None:
        """Start measuring the peak memory of one render."""

    def peak_memory_gb(self) -> float | None:
        """Peak memory since `reset_peak_memory` (device memory, or process RSS on a CPU), None if unknown."""

    def memory_report(self) -> dict:
        """Backend memory details for `Report.memory`."""
