"""The torch reference runtime: any torch device, CPU included. The CUDA backend reuses it with its own linears."""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from ... import weights
from ...prompt import FEATURE_LAYERS
from .linear import LowBitLinear
from .text_encoder import encode as encode_text
from .text_encoder import load_text_encoder
from .transformer import load_transformer
from .vae import load_vae_decoder


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class TorchRuntime:
    """Loaded transformer + VAE decoder; the text encoder is loaded for `encode` and freed afterwards."""

    name = "torch"

    def __init__(self, folder: Path, transformer, vae, device, dtype, layers, keep_text_encoder: bool):
        self.folder = folder
        self.transformer = transformer
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.layers = tuple(layers)
        self.keep_text_encoder = keep_text_encoder
        self._text_encoder = None

    @classmethod
    def load(cls, folder, device=None, dtype=None, make_linear=LowBitLinear, keep_text_encoder=False,
             layers=FEATURE_LAYERS):
        folder = Path(folder)
        device = torch.device(device or "cpu")
        dtype = dtype or default_dtype(device)
        tw = weights.read_transformer(folder, device=device)
        transformer = load_transformer(tw.tensors, tw.config, device=device, dtype=dtype, make_linear=make_linear)
        del tw
        vae_config, vae_state = weights.read_vae(folder)
        vae = load_vae_decoder(vae_state, vae_config, device=device, dtype=dtype)
        return cls(folder, transformer, vae, device, dtype, layers, keep_text_encoder)

    def _load_text_encoder(self):
        if self._text_encoder is None:
            config, state = weights.read_text_encoder(self.folder, layers=max(self.layers))
            self._text_encoder = load_text_encoder(config, state, device=self.device, dtype=self.dtype,
                                                   layers=self.layers)
        return self._text_encoder

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int64 [B, S] ids and mask -> features [B, S, 3 * hidden] in the runtime dtype."""
        model = self._load_text_encoder()
        features = encode_text(model, input_ids.to(self.device), attention_mask.to(self.device), self.layers)
        if not self.keep_text_encoder:
            self._text_encoder = None
            del model
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return features.to(self.dtype)

    @torch.inference_mode()
    def denoise(self, noise, features, sigmas, img_ids, txt_ids, callback=None) -> torch.Tensor:
        """Euler flow matching. noise: float [B, N_img, C] packed; sigmas: descending, ending with 0."""
        x = noise.to(self.device, self.dtype)
        batch = x.shape[0]
        sig = torch.as_tensor(sigmas, dtype=torch.float32)
        # The reference passes timestep = bf16(sigma * 1000) / 1000; the model multiplies by 1000 again.
        timesteps = sig[:-1] * 1000
        img_ids, txt_ids = img_ids.to(self.device), txt_ids.to(self.device)
        for i in range(len(sigmas) - 1):
            t = timesteps[i].expand(batch).to(self.device, self.dtype) / 1000
            v = self.transformer(x, features, t, img_ids, txt_ids)
            # Step in fp32 then cast back, as FlowMatchEulerDiscreteScheduler.step does.
            x = (x.float() + (sig[i + 1] - sig[i]).to(self.device) * v.float()).to(self.dtype)
            if callback is not None:
                callback(i, x)
        return x

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        """Packed latents [B, N_img, C] -> numpy uint8 [B, H, W, 3]."""
        return self.vae.decode_latents(latents.to(self.device, self.dtype), height, width)

    def reset_peak_memory(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_memory_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        return None
