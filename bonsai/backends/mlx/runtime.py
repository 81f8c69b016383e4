"""The MLX runtime: stock MLX on Apple Silicon (Metal) or MLX-CPU. Speaks numpy/torch-CPU at its boundary."""

from __future__ import annotations

import gc
import threading
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from ...config import VAEConfig
from . import mx_dtype, to_mx
from .text_encoder import DEFAULT_LAYERS, encode as encode_text, load_text_encoder_folder
from .transformer import load_transformer_folder
from .vae import load_vae_decoder

SAMPLE_EVERY_S = 0.05


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


class MemorySampler:
    """Samples mx.get_active_memory() every 50 ms in a background thread while a stage runs."""

    def __init__(self, every_s: float = SAMPLE_EVERY_S):
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []  # (time, active bytes)
        self._stop = threading.Event()
        self._thread = None

    def _run(self):
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), mx.get_active_memory()))
            self._stop.wait(self.every_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append((time.perf_counter(), mx.get_active_memory()))

    def summary(self) -> dict:
        return summarize(self.samples)


def summarize(samples: list[tuple[float, int]]) -> dict:
    """(time, bytes) samples -> seconds, GB*s (trapezoid integral), mean and max active GB."""
    if len(samples) < 2:
        gb = samples[0][1] / 1e9 if samples else 0.0
        return {"seconds": 0.0, "gb_s": 0.0, "mean_active_gb": gb, "max_active_gb": gb, "samples": len(samples)}
    t = np.array([s[0] for s in samples])
    gb = np.array([s[1] for s in samples]) / 1e9
    seconds = float(t[-1] - t[0])
    gb_s = float(np.sum((gb[1:] + gb[:-1]) / 2 * np.diff(t)))
    return {"seconds": seconds, "gb_s": gb_s, "mean_active_gb": gb_s / seconds if seconds > 0 else float(gb.mean()),
            "max_active_gb": float(gb.max()), "samples": len(samples)}


class MLXRuntime:
    """Loaded transformer + VAE decoder in MLX; the text encoder is loaded for `encode` and freed afterwards."""

    name = "mlx"

    def __init__(self, folder: Path, transformer, kind: str, vae, dtype: str, layers, keep_text_encoder: bool,
                 vae_max_memory_gb: float | None):
        import torch

        self.folder = folder
        self.transformer = transformer
        self.kind = kind
        self.vae = vae
        self.mx_dtype = mx_dtype(dtype)
        self.dtype = getattr(torch, dtype)  # the pipeline draws the seed's noise in this dtype, as the reference
        self.layers = tuple(layers)
        self.keep_text_encoder = keep_text_encoder
        self.vae_max_memory_gb = vae_max_memory_gb
        self._text_encoder = None
        self._stages: dict[str, list[dict]] = {}
        self._samples: list[tuple[float, int]] = []

    @classmethod
    def load(cls, folder, dtype=None, layers=DEFAULT_LAYERS, dense: bool = False, keep_text_encoder: bool = False,
             vae_max_memory_gb: float | None = None) -> "MLXRuntime":
        """dtype: "float16" | "bfloat16" | "float32" (None: fp16 on Metal, fp32 on CPU).

        dense=True dequantizes the low-bit linears into plain matmuls (the benchmark's baseline).
        """
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {folder} does not exist")
        dtype = dtype_name(dtype)
        transformer, kind = load_transformer_folder(folder, dtype=dtype, dense=dense)
        vae = load_vae_decoder(*read_vae(folder), dtype=dtype)
        return cls(folder, transformer, "dense" if dense else kind, vae, dtype, layers, keep_text_encoder,
                   vae_max_memory_gb)

    # --- memory proxy ---

    def _sampled(self, stage: str):
        runtime = self

        class _Stage(MemorySampler):
            def __exit__(self, *exc):
                super().__exit__(*exc)
                runtime._samples.extend(self.samples)
                runtime._stages.setdefault(stage, []).append(self.summary())

        return _Stage()

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

    def _load_text_encoder(self):
        if self._text_encoder is None:
            self._text_encoder = load_text_encoder_folder(self.folder, layers=self.layers, dtype=self.mx_dtype)
        return self._text_encoder

    def encode(self, input_ids, attention_mask) -> mx.array:
        """int64 [B, S] ids and mask (torch CPU) -> features mx [B, S, len(layers) * hidden] in the runtime dtype."""
        with self._sampled("encode"):
            model = self._load_text_encoder()
            features = encode_text(model, input_ids, attention_mask, self.layers).astype(self.mx_dtype)
            mx.eval(features)
            if not self.keep_text_encoder:
                self._text_encoder = None
                del model
                gc.collect()
                mx.clear_cache()
        return features

    def denoise(self, noise, features, sigmas, img_ids, txt_ids, callback=None) -> mx.array:
        """Euler flow matching. noise: float32 torch CPU [B, N_img, C] packed; sigmas: descending, ending with 0."""
        sig = [float(s) for s in sigmas]
        if len(sig) < 2 or sig[-1] != 0.0:
            raise ValueError(f"sigmas must hold at least two values and end with 0.0, got {sig}")
        with self._sampled("denoise"):
            x = to_mx(noise, mx.float32).astype(self.mx_dtype)
            features = to_mx(features).astype(self.mx_dtype)
            if features.shape[0] != x.shape[0]:
                raise ValueError(f"features batch {features.shape[0]} != noise batch {x.shape[0]}")
            rope = self.transformer.rope(img_ids, txt_ids)  # shared tables, once per render
            batch = x.shape[0]
            for i in range(len(sig) - 1):
                # The reference passes timestep = dtype(sigma * 1000) / 1000; the model multiplies by 1000 again.
                t = mx.full((batch,), sig[i] * 1000, mx.float32).astype(self.mx_dtype) / 1000
                v = self.transformer(x, features, t, rope=rope)
                # Step in fp32 then cast back, as FlowMatchEulerDiscreteScheduler.step does.
                x = (x.astype(mx.float32) + (sig[i + 1] - sig[i]) * v.astype(mx.float32)).astype(self.mx_dtype)
                mx.eval(x)
                if callback is not None:
                    callback(i, x)
        return x

    def decode(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents [B, N_img, C] (mx, torch or numpy) -> numpy uint8 [B, H, W, 3]."""
        with self._sampled("decode"):
            return self.vae.decode_latents(to_mx(latents), height, width, max_memory_gb=self.vae_max_memory_gb)


def read_vae(folder: Path) -> tuple[dict, VAEConfig]:
    """`vae/` of any released repo -> (state dict of mx arrays, config); mx.load maps the safetensors directly."""
    vae_dir = folder / "vae"
    config = VAEConfig.from_json(vae_dir / "config.json")
    path = vae_dir / "diffusion_pytorch_model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return mx.load(str(path)), config
