"""The MLX runtime: stock MLX on Apple Silicon (Metal) or MLX-CPU. Speaks numpy/torch-CPU at its boundary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...config import TextEncoderConfig, VAEConfig
from ...errors import BonsaiFileNotFoundError
from ...files import load_mlx
from ...memory import SAMPLE_EVERY_S, MemorySampler, summarize
from ...weights import check_vae_tensors
from ..torch.runtime import LazyModel
from . import mx_dtype, to_mx
from .text_encoder import encode as encode_text, load_text_encoder_folder
from .transformer import load_transformer_folder
from .lora import set_adapters as set_lora_adapters
from .vae import load_vae_decoder, load_vae_encoder

VAE_FILE = "diffusion_pytorch_model.safetensors"


def default_dtype() -> str:
    # fp16 on Metal: quantized_matmul with bf16 activations loses precision; fp32 on CPU (no fast fp16 GEMM).
    return "float16" if mx.metal.is_available() else "float32"


def dtype_name(dtype) -> str:
    """None | "float16" | torch.float16 | mx.float16 -> "float16" (likewise bfloat16, float32)."""
    if dtype is None:
        return default_dtype()
    name = str(dtype).split(".")[-1]
    mx_dtype(name)  # raises ValueError naming the allowed values
    return name


@dataclass(frozen=True)
class Cond:
    """One batch's conditioning: features [B, S, D], RoPE (cos, sin) float32 [S + N_img + M, head_dim] and the
    reference-image tokens [B, M, C] joined after the latents (None without references)."""

    features: mx.array
    rope: tuple[mx.array, mx.array]
    refs: mx.array | None = None


class MLXRuntime:
    """Loaded transformer + VAE decoder in MLX; the text encoder is loaded for `encode` and freed afterwards."""

    name = "mlx"

    def __init__(self, transformer, kind: str, vae, text_encoder: LazyModel, text_config: TextEncoderConfig,
                 dtype: str, vae_max_memory_gb: float | None, vae_encoder: LazyModel):
        import torch

        self.transformer = transformer
        self.kind = kind
        self.vae = vae
        self.text_encoder = text_encoder
        self.text_config = text_config
        self.mx_dtype = mx_dtype(dtype)
        self.dtype = getattr(torch, dtype)  # the pipeline draws the seed's noise in this dtype, as the reference
        self.vae_max_memory_gb = vae_max_memory_gb
        self.vae_encoder = vae_encoder  # loaded on the first image input
        self._stages: dict[str, list[dict]] = {}
        self._samples: list[tuple[float, int]] = []

    @classmethod
    def load(cls, folder, dtype=None, text_config: TextEncoderConfig = TextEncoderConfig(), dense: bool = False,
             keep_text_encoder: bool = False, vae_max_memory_gb: float | None = None) -> "MLXRuntime":
        """dtype: "float16" | "bfloat16" | "float32" (None: fp16 on Metal, fp32 on CPU).

        dense=True dequantizes the low-bit linears into plain matmuls (the benchmark's baseline).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise BonsaiFileNotFoundError(f"model folder {folder} does not exist")
        dtype = dtype_name(dtype)
        transformer, kind = load_transformer_folder(folder, dtype=dtype, dense=dense)
        vae_file = folder / "vae" / VAE_FILE
        vae = load_vae_decoder(*read_vae(folder), dtype=dtype, source=str(vae_file))
        te = LazyModel(lambda: load_text_encoder_folder(folder, layers=text_config.feature_layers, dtype=dtype),
                       keep_text_encoder, free=mx.clear_cache)
        encoder = LazyModel(lambda: load_vae_encoder(*read_vae(folder), dtype=dtype, source=str(vae_file)), keep=True)
        return cls(transformer, "dense" if dense else kind, vae, te, text_config, dtype, vae_max_memory_gb, encoder)

    # --- memory proxy ---

    def _sampled(self, stage: str):
        runtime = self

        class _Stage(MemorySampler):
            def __exit__(self, *exc):
                super().__exit__(*exc)
                runtime._samples.extend(self.samples)
                runtime._stages.setdefault(stage, []).append(self.summary())

        return _Stage(mx.get_active_memory)

    def reset_peak_memory(self):
        """Start a new render record (the pipeline calls this before each render)."""
        mx.reset_peak_memory()
        self._stages, self._samples = {}, []

    def peak_memory_gb(self) -> float:
        return mx.get_peak_memory() / 1e9

    def memory_report(self) -> dict:
        """Active-memory proxy since the last reset: mean active GB and GB*s, per stage and over the render."""
        total = summarize(sorted(self._samples))
        stages = {name: {k: sum(r[k] for r in runs) for k in ("seconds", "gb_s")} | {
            "mean_active_gb": sum(r["gb_s"] for r in runs) / max(sum(r["seconds"] for r in runs), 1e-9),
            "max_active_gb": max(r["max_active_gb"] for r in runs)} for name, runs in self._stages.items()}
        return {"proxy": f"mx.get_active_memory() every {int(SAMPLE_EVERY_S * 1000)} ms",
                "device": str(mx.default_device()), "kind": self.kind, "dtype": str(self.mx_dtype),
                "mean_active_gb": total["mean_active_gb"], "gb_s": total["gb_s"],
                "max_active_gb": total["max_active_gb"], "peak_gb": self.peak_memory_gb(), "stages": stages}

    # --- stages ---

    def encode(self, input_ids, attention_mask) -> mx.array:
        """int64 [B, S] ids and mask (torch CPU) -> features mx [B, S, len(layers) * hidden] in the runtime dtype."""
        with self._sampled("encode"):
            try:
                model = self.text_encoder.get()
                features = encode_text(model, input_ids, attention_mask, self.text_config.feature_layers)
                features = features.astype(self.mx_dtype)
                mx.eval(features)
            finally:
                self.text_encoder.done()
        return features

    def latents(self, noise) -> mx.array:
        return to_mx(noise, mx.float32).astype(self.mx_dtype)

    def encode_image(self, pixels):
        """Image [1, 3, H, W] in [-1, 1] (torch CPU) -> normalised packed latents [1, H*W/256, 128] (torch CPU f32)."""
        import torch

        with self._sampled("encode"):
            tokens = self.vae_encoder.get().encode_tokens(pixels)
            return torch.from_numpy(np.array(tokens.astype(mx.float32)))

    def set_adapters(self, adapters) -> None:
        """The LoRA branches beside the linears, exactly these (Lora, strength) pairs; [] restores the model."""
        set_lora_adapters(self.transformer, adapters, self.mx_dtype)

    def condition(self, features, img_ids, txt_ids, refs=None) -> Cond:
        """refs: (reference tokens [1, M, C] torch CPU, their ids [M, 4]) or None."""
        import torch

        feats = mx.concatenate([to_mx(f).astype(self.mx_dtype) for f in features])
        if refs is None:
            return Cond(feats, self.transformer.rope(img_ids, txt_ids))
        tokens, ids = refs
        tokens = to_mx(tokens).astype(self.mx_dtype)
        return Cond(feats, self.transformer.rope(torch.cat([img_ids, ids]), txt_ids),
                    mx.broadcast_to(tokens, (feats.shape[0], *tokens.shape[1:])))

    def velocity(self, x: mx.array, timestep: float, cond: Cond) -> mx.array:
        with self._sampled("denoise"):
            t = mx.full((x.shape[0],), timestep, self.mx_dtype)
            if cond.refs is None:
                v = self.transformer(x, cond.features, t, rope=cond.rope)
            else:  # references join the sequence after the latents; only the latents' velocity is used
                v = self.transformer(mx.concatenate([x, cond.refs], axis=1), cond.features, t,
                                     rope=cond.rope)[:, :x.shape[1]]
            mx.eval(v)
        return v

    def synchronize(self) -> None:
        mx.synchronize()

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents [B, N_img, C] (mx, torch or numpy) -> numpy uint8 [B, H, W, 3]."""
        with self._sampled("decode"):
            return self.vae.decode_latents(to_mx(latents), height, width, max_memory_gb=self.vae_max_memory_gb)


def read_vae(folder: Path) -> tuple[dict, VAEConfig]:
    """`vae/` of any released repo -> (state dict of mx arrays, config); mx.load maps the safetensors directly."""
    vae_dir = folder / "vae"
    config = VAEConfig.from_json(vae_dir / "config.json")
    path = vae_dir / VAE_FILE
    state = load_mlx(path)
    check_vae_tensors(state, path)
    return state, config
