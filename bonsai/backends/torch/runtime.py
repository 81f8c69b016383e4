"""The torch reference runtime: any torch device, CPU included. The CUDA backend reuses it with its own linears."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ... import layouts, weights
from ...config import TextEncoderConfig
from ...errors import BonsaiValueError
from ...memory import MemorySampler, available_bytes, cuda_bytes, keep_resident, render_bytes, rss_bytes
from .linear import LowBitLinear
from .lora import set_adapters as set_lora_adapters
from .text_encoder import encode as encode_text
from .text_encoder import TORCH_TEXT_OPS, TextOps, load_text_encoder
from .transformer import TORCH_OPS, Ops, load_transformer
from .vae import TORCH_VAE_OPS, VaeOps, load_vae_decoder, load_vae_encoder


ENCODE_BATCH = 8  # prompts per text-encoder forward: bounds its activations (512 tokens each)


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


class LazyModel:
    """A model loaded on first use. keep=True keeps it resident after each use; keep=False drops it after each use;
    `release()` drops it on demand (e.g. when a render needs the memory). With `offload`, a released model is kept
    in host memory and comes back without a disk read: offload(model, previous host copy or None) -> host copy
    (made once: the weights never change), restore(host copy) -> the model on its device."""

    def __init__(self, load: Callable[[], object], keep: bool, free: Callable[[], None] = lambda: None,
                 offload: Callable[[object, object], object] | None = None,
                 restore: Callable[[object], object] | None = None):
        self._load, self._free, self.keep = load, free, keep
        self._offload, self._restore = offload, restore
        self._model = None
        self._host = None  # the offloaded model

    @property
    def resident(self) -> bool:
        return self._model is not None

    def get(self):
        if self._model is None:
            self._model = self._restore(self._host) if self._host is not None else self._load()
        return self._model

    def done(self) -> None:
        """The caller is done with the model: drop it unless it is kept."""
        if not self.keep:
            self.release()

    def release(self) -> None:
        if self._model is None:
            return
        model, self._model = self._model, None
        if self._offload is not None:
            self._host = self._offload(model, self._host)
        del model
        gc.collect()
        self._free()


@dataclass(frozen=True)
class Cond:
    """One batch's conditioning: features [B, S, D] on the device, RoPE angles complex64 [S + N_img + M, d/2] and
    the reference-image tokens [B, M, C] joined after the latents (None without references)."""

    features: torch.Tensor
    rope: torch.Tensor
    refs: torch.Tensor | None = None


ROPE_TABLES = 4  # RoPE tables a runtime keeps (one per image size and reference layout in recent use)


class TorchRuntime:
    """Transformer + VAE decoder resident; the text encoder loaded for `encode` (see `LazyModel`)."""

    name = "torch"

    def __init__(self, transformer, vae, text_encoder: LazyModel, text_config: TextEncoderConfig, device, dtype,
                 vae_encoder: LazyModel, vae_tile: bool | None = None, auto_residency: bool = False):
        self.transformer = transformer
        self.vae = vae
        self.vae_encoder = vae_encoder  # loaded on the first image input
        self.vae_tile = vae_tile  # None: tile only images above 1024 px per side
        self.auto_residency = auto_residency  # free the kept text encoder when a render needs its memory
        self.text_encoder = text_encoder
        self.text_config = text_config
        self.device = torch.device(device)
        self.dtype = dtype
        self._sampler: MemorySampler | None = None
        self._ropes: dict[tuple, torch.Tensor] = {}  # RoPE tables by position ids, most recent last

    @classmethod
    def load(cls, folder, device=None, dtype=None, text_config: TextEncoderConfig = TextEncoderConfig(),
             keep_text_encoder: bool | str = "auto", make_linear=LowBitLinear) -> "TorchRuntime":
        """keep_text_encoder: "auto" keeps it loaded between prompts while the device has room for it next to the
        render's activations (else it is freed before the render), True always, False re-reads it per prompt."""
        if keep_text_encoder not in (True, False, "auto"):
            raise BonsaiValueError(f"keep_text_encoder must be True, False or 'auto', got {keep_text_encoder!r}")
        folder = Path(folder)
        device = torch.device(device or "cpu")
        dtype = dtype or default_dtype(device)
        transformer = read_transformer(folder, device, dtype, make_linear)
        te = LazyModel(text_encoder_loader(folder, text_config, device, dtype), keep_text_encoder is not False,
                       free=_empty_cache(device))
        return cls(transformer, read_vae_decoder(folder, device, dtype), te, text_config, device, dtype,
                   vae_encoder_loader(folder, device, dtype), auto_residency=keep_text_encoder == "auto")

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """int64 [B, S] ids and mask -> features [B, S, len(feature_layers) * hidden] in the runtime dtype."""
        try:
            run = self.text_encoder_call()
            features = [run(ids.to(self.device), mask.to(self.device))
                        for ids, mask in zip(input_ids.split(ENCODE_BATCH), attention_mask.split(ENCODE_BATCH))]
        finally:
            self.text_encoder.done()
        return torch.cat(features).to(self.dtype)

    def text_encoder_call(self) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The loaded text encoder as `run(ids, mask)` (int64 [B, S] on the device) -> features [B, S, D]."""
        model = self.text_encoder.get()
        return lambda ids, mask: encode_text(model, ids, mask, self.text_config.feature_layers)

    def latents(self, noise: torch.Tensor) -> torch.Tensor:
        return noise.to(self.device, self.dtype)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image [1, 3, H, W] in [-1, 1] (torch CPU) -> normalised packed latents [1, H*W/256, 128] (torch CPU f32)."""
        return self.vae_encoder.get().encode_tokens(pixels.to(self.device, self.dtype)).cpu()

    def set_adapters(self, adapters) -> None:
        """The LoRA branches beside the linears, exactly these (Lora, strength) pairs; [] restores the model."""
        set_lora_adapters(self.transformer, adapters, self.device, self.dtype)

    @torch.inference_mode()
    def condition(self, features, img_ids, txt_ids, refs=None) -> Cond:
        """refs: (reference tokens [1, M, C] torch CPU, their ids [M, 4]) or None."""
        if self.auto_residency and self.text_encoder.resident:
            free = available_bytes(self.device)
            pixels = img_ids.shape[-2] * 256  # one token per 16x16 pixels
            if free is not None and not keep_resident(free, render_bytes(len(features), pixels)):
                self.text_encoder.release()
        feats = torch.cat(list(features)).to(self.device, self.dtype)
        if refs is None:
            return Cond(feats, self._rope(img_ids, txt_ids))
        tokens, ids = refs
        rope = self._rope(torch.cat([img_ids, ids]), txt_ids)
        return Cond(feats, rope, tokens.to(self.device, self.dtype).expand(feats.shape[0], -1, -1))

    def _rope(self, img_ids: torch.Tensor, txt_ids: torch.Tensor) -> torch.Tensor:
        """The transformer's RoPE table on the device, computed once per distinct position ids: they depend only
        on the image size and the references, and the float64 tables cost ~10 ms of CPU time at 1024x1024."""
        key = (txt_ids.shape, torch.cat([txt_ids.reshape(-1), img_ids.reshape(-1)]).cpu().numpy().tobytes())
        rope = self._ropes.pop(key, None)
        if rope is None:
            rope = self.transformer.rope(img_ids, txt_ids, self.device)
        self._ropes[key] = rope
        while len(self._ropes) > ROPE_TABLES:
            self._ropes.pop(next(iter(self._ropes)))
        return rope

    @torch.inference_mode()
    def velocity(self, x: torch.Tensor, timestep: float, cond: Cond) -> torch.Tensor:
        t = torch.full((x.shape[0],), timestep, device=self.device, dtype=self.dtype)
        if cond.refs is None:
            return self.transformer(x, cond.features, t, rope=cond.rope)
        # References join the sequence after the latents; only the latents' velocity is used.
        return self.transformer(torch.cat([x, cond.refs], dim=1), cond.features, t, rope=cond.rope)[:, :x.shape[1]]

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        """Packed latents [B, N_img, C] -> numpy uint8 [B, H, W, 3]."""
        return self.vae.decode_latents(latents.to(self.device, self.dtype), height, width, tile=self.vae_tile)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # --- memory ---

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self._stop_sampler()
        self._sampler = MemorySampler(rss_bytes).__enter__()

    def peak_memory_gb(self) -> float | None:
        """Device peak on CUDA; on a CPU the peak process RSS sampled since `reset_peak_memory` (every 50 ms)."""
        if self.device.type == "cuda":
            return cuda_bytes(self.device)["peak"] / 1e9
        sampler = self._stop_sampler()
        return sampler.peak_gb() if sampler is not None else None

    def memory_report(self) -> dict:
        if self.device.type == "cuda":
            held = cuda_bytes(self.device)
            return dict(allocated_gb=held["current"] / 1e9, peak_gb=held["peak"] / 1e9,
                        reserved_gb=held["reserved"] / 1e9, peak_reserved_gb=held["peak_reserved"] / 1e9)
        return {}

    def _stop_sampler(self) -> MemorySampler | None:
        sampler, self._sampler = self._sampler, None
        if sampler is not None:
            sampler.__exit__(None, None, None)
        return sampler


# --- loading, shared with the CUDA runtime ---


def read_transformer(folder: Path, device, dtype, make_linear, ops: Ops = TORCH_OPS):
    tw = weights.read_transformer(folder, device=device)
    source = tw.path / layouts.get_layout(tw.layout).weight_file
    return load_transformer(tw.tensors, tw.config, device=device, dtype=dtype, make_linear=make_linear,
                            source=str(source), ops=ops)


def read_vae_decoder(folder: Path, device, dtype, ops: VaeOps = TORCH_VAE_OPS):
    config, state = weights.read_vae(folder)
    return load_vae_decoder(state, config, device=device, dtype=dtype, source=str(folder / weights.VAE_FILE),
                            ops=ops)


def vae_encoder_loader(folder: Path, device, dtype) -> LazyModel:
    def load():
        config, state = weights.read_vae(folder)
        return load_vae_encoder(state, config, device=device, dtype=dtype, source=str(folder / weights.VAE_FILE))

    return LazyModel(load, keep=True)


def text_encoder_loader(folder: Path, text_config: TextEncoderConfig, device, dtype, packed_linear=None,
                        ops: TextOps = TORCH_TEXT_OPS):
    """The text encoder's load function; packed_linear: keep the HQQ pack's linears 4-bit as these modules; ops:
    its elementwise steps."""

    def load():
        packed = packed_linear is not None
        config, state = weights.read_text_encoder(folder, layers=text_config.layers_needed, dtype=dtype,
                                                  packed=packed, device=device if packed else None)
        return load_text_encoder(config, state, device=device, dtype=dtype, layers=text_config.feature_layers,
                                 make_linear=packed_linear, source=str(weights.find_text_encoder(folder)[1]),
                                 ops=ops)

    return load


def _empty_cache(device: torch.device) -> Callable[[], None]:
    return torch.cuda.empty_cache if device.type == "cuda" else (lambda: None)
