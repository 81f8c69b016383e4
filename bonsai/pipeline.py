"""`bonsai.Pipeline`: one text-to-image API over every backend."""

from __future__ import annotations

import json
import resource
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from . import __version__, hub, latents, scheduler, sizes, weights
from .backends import load_runtime, resolve
from .config import SchedulerConfig
from .prompt import load_tokenizer, tokenize
from .sizes import check_size

MAX_SEED = 2**32


@dataclass
class Report:
    """Stage times in seconds and peak memory of one call."""

    backend: str
    images: int
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    peak_memory_gb: float | None = None
    memory: dict = field(default_factory=dict)

    def __str__(self) -> str:
        mem = f", peak {self.peak_memory_gb:.2f} GB" if self.peak_memory_gb is not None else ""
        return (f"{self.images} image(s) on {self.backend}: encode {self.encode_s:.2f} s, denoise {self.denoise_s:.2f} s, "
                f"decode {self.decode_s:.2f} s, total {self.total_s:.2f} s{mem}")


@dataclass
class Result:
    images: list[Image.Image]
    report: Report

    @property
    def image(self) -> Image.Image:
        return self.images[0]

    def save(self, path: str | Path) -> list[Path]:
        """Save as PNG with the generation metadata as text chunks. A folder gets one file per image."""
        path = Path(path)
        if len(self.images) == 1 and path.suffix.lower() == ".png":
            targets = [path]
        else:
            path.mkdir(parents=True, exist_ok=True)
            targets = [path / f"bonsai-{img.info['bonsai_seed']}-{i}.png" for i, img in enumerate(self.images)]
        for img, target in zip(self.images, targets):
            save_png(img, target)
        return targets


def save_png(image: Image.Image, path: str | Path) -> None:
    info = PngImagePlugin.PngInfo()
    for k, v in image.info.items():
        if k.startswith("bonsai"):
            info.add_text(k, str(v))
    image.save(path, pnginfo=info)


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


class Pipeline:
    """Text-to-image with Bonsai Image 4B.

    >>> pipe = bonsai.Pipeline.from_pretrained("prism-ml/bonsai-image-ternary-4B-gemlite-2bit")
    >>> result = pipe("a bonsai tree on a desk", width=512, height=512, seed=0)
    >>> result.save("bonsai.png")
    """

    def __init__(self, runtime, tokenizer, scheduler_config: SchedulerConfig, model: str, variant: str):
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.model = model
        self.variant = variant
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, backend: str = "auto", device=None, dtype=None,
                        revision: str | None = None, local_files_only: bool = False, **options) -> "Pipeline":
        """Load a released repo (any layout) or a local folder.

        Args:
            repo_id_or_dir: e.g. "prism-ml/bonsai-image-ternary-4B-gemlite-2bit", or a folder.
            backend: "auto", "torch", "cuda" or "mlx".
            device, dtype: torch device/dtype for the torch and cuda backends (dtype also names the MLX dtype).
            options: passed to the backend's runtime loader.
        """
        chosen = resolve(backend)
        folder = hub.resolve(repo_id_or_dir, revision=revision, local_files_only=local_files_only)
        info = weights.describe(folder)
        runtime = load_runtime(chosen, folder, device=device, dtype=dtype, **options)
        tokenizer = load_tokenizer(weights.tokenizer_dir(folder))
        sched_file = folder / "scheduler" / "scheduler_config.json"
        sched = SchedulerConfig.from_json(sched_file) if sched_file.is_file() else SchedulerConfig()
        return cls(runtime, tokenizer, sched, str(repo_id_or_dir), f"{info.kind}-{info.layout}")

    @property
    def backend(self) -> str:
        return self.runtime.name

    def warmup(self, sizes=((1024, 1024),)) -> dict[tuple[int, int], float]:
        """Compile, autotune and capture for these (width, height) sizes now, not in the first image.

        Returns seconds per size. Backends without their own warm-up render one 1-step image per size.
        """
        for width, height in sizes:
            check_size(width, height)
        if hasattr(self.runtime, "warmup"):
            with self._lock:
                seconds = self.runtime.warmup([(h, w) for w, h in sizes])  # the runtime takes (height, width)
            return {(w, h): s for (h, w), s in seconds.items()}
        out = {}
        for width, height in sizes:
            t0 = time.perf_counter()
            self("warm-up", width=width, height=height, steps=1, seed=0, progress=False)
            out[(width, height)] = time.perf_counter() - t0
        return out

    def __call__(self, prompt: str | list[str], width: int | None = None, height: int | None = None,
                 steps: int = 4, seed: int | list[int] | None = None, style: str | None = None,
                 aspect: str | None = None, long_edge: int | None = None,
                 callback: Callable[[int, object], None] | None = None, progress: bool = True) -> Result:
        """Render one image per prompt.

        Args:
            prompt: a prompt or a list of prompts.
            width, height: pixels, multiples of 16 (default 512x512); or `aspect` ("16:9") + `long_edge`.
            steps: Euler steps (4 is the distilled default).
            seed: int (image i uses seed + i), a list of ints, or None for random seeds.
            style: one of `bonsai.sizes.STYLES`, appended to every prompt.
            callback: called as callback(step_index, latents) after each step.
        Returns:
            Result with `.images` (PIL, metadata in `.info`) and `.report` (stage times, peak memory).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise ValueError("prompt must be a non-empty string or a non-empty list of non-empty strings")
        width, height = self._size(width, height, aspect, long_edge)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        seeds = self._seeds(seed, len(prompts))
        full_prompts = [sizes.apply_style(p, style) for p in prompts]

        with self._lock:
            return self._render(prompts, full_prompts, seeds, width, height, steps, style, callback, progress)

    def _size(self, width, height, aspect, long_edge) -> tuple[int, int]:
        if aspect is not None or long_edge is not None:
            if width is not None or height is not None:
                raise ValueError("pass either width/height or aspect/long_edge, not both")
            width, height = sizes.size_from_aspect(aspect or "1:1", long_edge or 1024)
        width = 512 if width is None else width
        height = 512 if height is None else height
        sizes.check_size(width, height)
        return width, height

    @staticmethod
    def _seeds(seed, n: int) -> list[int]:
        if seed is None:
            base = secrets.randbelow(MAX_SEED - n)
            return [base + i for i in range(n)]
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) and not isinstance(seed, bool) else list(seed)
        if len(seeds) != n or not all(isinstance(s, int) and 0 <= s < MAX_SEED for s in seeds):
            raise ValueError(f"seed must be an int in [0, 2**32) or a list of {n} such ints, got {seed!r}")
        return seeds

    def _render(self, prompts, full_prompts, seeds, width, height, steps, style, callback, progress) -> Result:
        from tqdm.auto import tqdm

        rt = self.runtime
        report = Report(backend=rt.name, images=len(prompts))
        if hasattr(rt, "reset_peak_memory"):
            rt.reset_peak_memory()
        t_start = time.perf_counter()

        # 1. Prompt features, all prompts at once; the text encoder is freed afterwards.
        input_ids, mask = tokenize(self.tokenizer, full_prompts)
        features = rt.encode(input_ids, mask)
        report.encode_s = time.perf_counter() - t_start

        # 2. Shared inputs of the denoise loop.
        h, w = height // 16, width // 16
        sigmas = scheduler.sigmas(steps, h * w, self.scheduler_config)
        img_ids, txt_ids = latents.img_ids(h, w), latents.txt_ids(input_ids.shape[1])

        images = []
        bar = tqdm(total=steps * len(prompts), disable=not progress, desc="denoise")

        def step(i, x):
            bar.update(1)
            if callback is not None:
                callback(i, x)

        try:
            for n, seed in enumerate(seeds):
                # 3. One image at a time, so that its seed alone reproduces it exactly.
                t0 = time.perf_counter()
                noise = latents.pack(latents.noise(seed, height, width, dtype=rt_noise_dtype(rt)))
                x = rt.denoise(noise.float(), features[n : n + 1], sigmas, img_ids, txt_ids, callback=step)
                t1 = time.perf_counter()
                pixels = rt.decode(x, height, width)
                report.denoise_s += t1 - t0
                report.decode_s += time.perf_counter() - t1
                images.append(self._image(pixels[0], prompts[n], style, seed, width, height, steps))
        finally:
            bar.close()

        report.total_s = time.perf_counter() - t_start
        peak = rt.peak_memory_gb() if hasattr(rt, "peak_memory_gb") else None
        report.peak_memory_gb = peak if peak is not None else _peak_rss_gb()
        if hasattr(rt, "memory_report"):
            report.memory = rt.memory_report()
        return Result(images, report)

    def _image(self, pixels: np.ndarray, prompt, style, seed, width, height, steps) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
        meta = dict(prompt=prompt, style=style, seed=seed, width=width, height=height, steps=steps,
                    model=self.model, variant=self.variant, backend=self.backend, bonsai=__version__)
        img.info["bonsai"] = json.dumps(meta)
        for k, v in meta.items():
            img.info[f"bonsai_{k}"] = v
        return img


def rt_noise_dtype(rt) -> torch.dtype:
    """The reference draws noise in the latents' dtype (bf16 on CUDA), so the same seed needs the same dtype."""
    dtype = getattr(rt, "dtype", torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def metadata(image: Image.Image) -> dict:
    """The generation parameters stored in a bonsai PNG (`Image.open(path)`), as keyword arguments."""
    text = getattr(image, "text", None) or image.info
    if "bonsai" not in text:
        raise ValueError("this image has no bonsai metadata")
    return json.loads(text["bonsai"])


__all__ = ["Pipeline", "Result", "Report", "save_png", "metadata"]
