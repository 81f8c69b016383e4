"""`bonsai.Pipeline`: one text-to-image API over every backend.

The flow, all in this file over shared modules: prompt -> tokens (`prompt`) -> features (`Runtime.encode`, cached)
-> seeded noise (`latents`) -> schedule (`scheduler`) -> Euler sampler (`sampling`) over `Runtime.velocity` ->
`Runtime.decode` -> PIL images with their generation metadata.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from . import __version__, hub, images, latents, params, sampling, scheduler, weights
from .backends import load_runtime, resolve
from .config import SchedulerConfig, TextEncoderConfig, TransformerConfig
from .errors import BonsaiValueError, Cancelled
from .lora import read_lora
from .prompt import tokenize
from .tokenizer import load_tokenizer
from .runtime import Runtime

FEATURE_CACHE = 16  # prompts whose features are kept (bf16 klein: 7.9 MB each)
MAX_LORA_SCALE = 10.0


@dataclass(frozen=True)
class Inputs:
    """A call's image inputs: reference images [1, 3, H_i, W_i], the image-to-image start image and its step."""

    refs: list | None = None
    init: torch.Tensor | None = None
    strength: float = 1.0
    start: int = 0


@dataclass
class Report:
    """Stage times in seconds and peak memory of one call. encode_s runs to the device's end of the text encoder,
    the first batch's noise and conditioning (prepared meanwhile) included."""

    backend: str
    images: int
    encode_s: float = 0.0
    denoise_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    peak_memory_gb: float | None = None
    encoded: int = 0  # prompts that ran the text encoder (the others came from the feature cache)
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
        """Save as PNG with the generation metadata as text chunks: one image to a `.png` path; several images to
        a folder (created), one file per image."""
        path = Path(path)
        if path.suffix.lower() == ".png" and len(self.images) == 1:
            targets = [path]
        elif path.suffix:
            raise BonsaiValueError(f"save: {path} must be a .png file for one image, or a folder (no suffix) for "
                                   f"{len(self.images)}")
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
    image.save(path, format="PNG", pnginfo=info)


class Pipeline:
    """Text-to-image with Bonsai Image 4B.

    >>> pipe = bonsai.Pipeline.from_pretrained("prism-ml/bonsai-image-ternary-4B-gemlite-2bit")
    >>> result = pipe("a bonsai tree on a desk", width=512, height=512, seed=0)
    >>> result.save("bonsai.png")
    """

    def __init__(self, runtime: Runtime, tokenizer, scheduler_config: SchedulerConfig, text_config: TextEncoderConfig,
                 transformer_config: TransformerConfig, model: str, variant: str, feature_cache: int = FEATURE_CACHE,
                 load_report: dict | None = None):
        self.runtime = runtime
        self.transformer_config = transformer_config
        self.tokenizer = tokenizer
        self.scheduler_config = scheduler_config
        self.text_config = text_config
        self.model = model
        self.variant = variant
        self.feature_cache = feature_cache
        self.load_report = dict(load_report or {})  # seconds per loading stage (from_pretrained)
        self._features: OrderedDict[str, object] = OrderedDict()  # full prompt -> features [1, S, D]
        self._loras: dict[str, tuple] = {}  # name -> (bonsai.lora.Lora, strength)
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, repo_id_or_dir: str | Path, backend: str = "auto", device=None, dtype=None,
                        revision: str | None = None, local_files_only: bool = False,
                        feature_cache: int = FEATURE_CACHE, verify: bool | None = None, **options) -> "Pipeline":
        """Load a released repo (any layout) or a local folder.

        Args:
            repo_id_or_dir: e.g. "prism-ml/bonsai-image-ternary-4B-gemlite-2bit", or a folder.
            backend: "auto", "torch", "cuda" or "mlx".
            device, dtype: torch device/dtype for the torch and cuda backends (dtype also names the MLX dtype).
            feature_cache: how many prompts' features to keep (a repeated prompt skips the text encoder).
            verify: check the files against the sha256 sums of the repo's manifest.json: None (default) after a
                download, True for a local folder too, False never (see `bonsai.hub.resolve`).
            options: passed to the backend's runtime loader.
        """
        t0 = time.perf_counter()
        chosen = resolve(backend)
        folder = hub.resolve(repo_id_or_dir, revision=revision, local_files_only=local_files_only, verify=verify)
        info = weights.describe(folder)
        text_config = weights.text_encoder_config(folder)
        t1 = time.perf_counter()
        runtime = load_runtime(chosen, folder, device=device, dtype=dtype, text_config=text_config, **options)
        t2 = time.perf_counter()
        tokenizer = load_tokenizer(weights.tokenizer_dir(folder))
        sched_file = folder / "scheduler" / "scheduler_config.json"
        sched = SchedulerConfig.from_json(sched_file) if sched_file.is_file() else SchedulerConfig()
        report = {"resolve_s": t1 - t0, "runtime_s": t2 - t1, "tokenizer_s": time.perf_counter() - t2}
        return cls(runtime, tokenizer, sched, text_config, info.config, str(repo_id_or_dir),
                   f"{info.kind}-{info.layout}", feature_cache, report)

    @property
    def backend(self) -> str:
        return self.runtime.name

    def warmup(self, sizes=((1024, 1024),)) -> dict[tuple[int, int], float]:
        """Render a 1-step image per (width, height) now, so that kernel compilation, GEMM choices and graph
        captures happen here rather than in the first real image. Returns seconds per size."""
        checked = [params.size(w, h) for w, h in sizes]
        out = {}
        for width, height in checked:
            t0 = time.perf_counter()
            self("warm-up", width=width, height=height, steps=1, seed=0, progress=False)
            out[(width, height)] = time.perf_counter() - t0
        return out

    def __call__(self, prompt: str | list[str], width: int | None = None, height: int | None = None,
                 steps: int = 4, seed: int | list[int] | None = None, style: str | None = None,
                 aspect: str | None = None, long_edge: int | None = None, batch_size: int = 1,
                 image=None, init_image=None, strength: float = 1.0,
                 callback: Callable[[int, object], None] | None = None, cancel: threading.Event | None = None,
                 progress: bool = True) -> Result:
        """Render one image per prompt.

        Args:
            prompt: a prompt or a list of prompts.
            width, height: pixels, multiples of 16 (default 512x512, or the size of `init_image` / the first
                reference image); or `aspect` ("16:9") + `long_edge`.
            steps: Euler steps, 1 to `bonsai.params.MAX_STEPS` (4 is the distilled default).
            seed: int (image i uses seed + i), a list of ints, or None for random seeds.
            style: one of `bonsai.sizes.STYLES`, appended to every prompt.
            batch_size: images denoised together through one forward; each image keeps the pixels its prompt
                and seed give alone (up to float rounding).
            image: reference image(s) to edit or to take elements from (PIL, or a list of up to 4), as
                FLUX.2 [klein] takes them: their latents join the sequence, they are never noised.
            init_image, strength: image-to-image: start from `init_image` noised to the level `strength` selects
                (0 < strength <= 1; 1.0 is plain text-to-image with the same seed).
            callback: called as callback(step_index, latents) after each step of each batch; raising stops.
            cancel: a threading.Event; once set, the render stops at the next step or stage with
                `bonsai.errors.Cancelled`.
        Returns:
            Result with `.images` (PIL, metadata in `.info`) and `.report` (stage times, peak memory).
        """
        refs = images.reference_tensors(image) if image is not None else None
        init = None
        if init_image is not None:
            given = (width, height) if width is not None or height is not None else (None, None)
            init = images.init_tensor(init_image, *given)
        if width is None and height is None and aspect is None and long_edge is None:
            first = init if init is not None else refs[0] if refs else None
            if first is not None:
                height, width = first.shape[-2:]
        request = params.check(prompt, width, height, steps, seed, style, aspect, long_edge, batch_size)
        strength = params.finite(strength, "strength", 0.0, 1.0)
        if init is None and strength != 1.0:
            raise BonsaiValueError("strength applies to image-to-image: pass init_image too")
        start = scheduler.start_step(request.steps, strength) if init is not None else 0
        with self._lock:
            return self._render(request, Inputs(refs, init, strength, start), callback, cancel, progress)

    def _render(self, req: params.Request, inputs: "Inputs", callback, cancel, progress) -> Result:
        from tqdm.auto import tqdm

        rt = self.runtime
        report = Report(backend=rt.name, images=len(req.prompts))
        rt.reset_peak_memory()
        t_start = time.perf_counter()
        # The seeded noise is drawn on the host with a CPU generator (diffusers' numbers), 6-7 ms per 1024x1024
        # image on the H200's host (`latents.noise`): a worker thread draws it while the device encodes and denoises.
        draws = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonsai-noise")
        try:
            noises = [draws.submit(latents.noise, seed, req.height, req.width, dtype=rt.dtype) for seed in req.seeds]
            # 1. Prompt features (repeated prompts come from the cache); image latents of the inputs.
            _check_cancel(cancel)
            features = self._encode(req.full_prompts, report)
            refs = x0 = None
            if inputs.refs:
                tokens = [rt.encode_image(r) for r in inputs.refs]
                sizes = [latents.latent_size(*r.shape[-2:]) for r in inputs.refs]
                refs = (torch.cat(tokens, dim=1), latents.reference_ids(sizes))
            if inputs.init is not None:
                x0 = rt.encode_image(inputs.init).to(rt.dtype)

            # 2. What every image of this size shares: schedule and position ids.
            h, w = latents.latent_size(req.height, req.width)
            sigmas = scheduler.sigmas(req.steps, h * w, self.scheduler_config)
            img_ids, txt_ids = latents.img_ids(h, w), latents.txt_ids(self.text_config.max_length)
            n = len(req.prompts)
            batches = [range(first, min(first + req.batch_size, n)) for first in range(0, n, req.batch_size)]

            def prepare(idx: range):
                """A batch's conditioning and starting latents on the device; each image's noise from its seed."""
                # [B, C, h, w] -> tokens [B, h*w, C] as a view: the backend moves it as it lies in memory
                # (a host-side transpose of the bf16 noise costs 5 ms at 1024x1024)
                noise = latents.pack(torch.cat([noises[i].result() for i in idx]))
                if x0 is not None:
                    noise = scheduler.noise_to(x0.expand_as(noise), noise, sigmas[inputs.start])
                return rt.condition([features[i] for i in idx], img_ids, txt_ids, refs), rt.latents(noise)

            # The host prepares the first batch (and the progress bar, ~1 ms) while the device still encodes:
            # their device work queues behind the text encoder's.
            cond, x = prepare(batches[0])
            out = []
            runs = req.steps - inputs.start
            with tqdm(total=runs * n, disable=not progress, desc="denoise") as bar:
                rt.synchronize()
                report.encode_s = time.perf_counter() - t_start

                # 3. Batches of up to batch_size images through one forward.
                for idx in batches:
                    t0 = time.perf_counter()
                    if idx is not batches[0]:
                        cond, x = prepare(idx)
                    for step, x in sampling.sample(lambda x, t: rt.velocity(x, t, cond), x, sigmas, rt.dtype,
                                                   start=inputs.start):
                        bar.update(len(idx))
                        if callback is not None:
                            callback(step, x)
                        _check_cancel(cancel)
                    rt.synchronize()
                    t1 = time.perf_counter()
                    pixels = rt.decode(x, req.height, req.width)
                    report.denoise_s += t1 - t0
                    report.decode_s += time.perf_counter() - t1
                    out += [self._image(pixels[j], req, inputs, i) for j, i in enumerate(idx)]
        finally:
            draws.shutdown(wait=False, cancel_futures=True)  # a failed or cancelled render draws no more
            report.peak_memory_gb = rt.peak_memory_gb()
        report.total_s = time.perf_counter() - t_start
        report.memory = rt.memory_report()
        return Result(out, report)

    # --- LoRA ---

    def load_lora(self, path_or_repo_id: str | Path, scale: float = 1.0, name: str | None = None) -> str:
        """Add a LoRA (a .safetensors file, a folder holding one, or a hub repo id) at strength `scale`, beside
        the packed weights (never merged into them). Returns its name (default: the file's stem)."""
        scale = params.finite(scale, "scale", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        path = Path(path_or_repo_id).expanduser()
        if not path.exists():
            path = hub.resolve_lora(str(path_or_repo_id))
        lora = read_lora(path, self.transformer_config)
        name = name or Path(lora.source).stem
        if name in self._loras:
            raise BonsaiValueError(f"a LoRA named {name!r} is loaded already; pass another name or unload it")
        with self._lock:
            self.runtime.set_adapters([*self._loras.values(), (lora, scale)])
            self._loras[name] = (lora, scale)
        return name

    def set_lora_scale(self, name: str, scale: float) -> None:
        if name not in self._loras:
            raise BonsaiValueError(f"no LoRA named {name!r}; loaded: {list(self._loras)}")
        scale = params.finite(scale, "scale", -MAX_LORA_SCALE, MAX_LORA_SCALE)
        with self._lock:
            loras = dict(self._loras, **{name: (self._loras[name][0], scale)})
            self.runtime.set_adapters(list(loras.values()))
            self._loras = loras

    def unload_lora(self, name: str | None = None) -> None:
        """Remove one LoRA, or all of them (name=None); the model renders exactly as before they were loaded."""
        if name is not None and name not in self._loras:
            raise BonsaiValueError(f"no LoRA named {name!r}; loaded: {list(self._loras)}")
        with self._lock:
            loras = {} if name is None else {k: v for k, v in self._loras.items() if k != name}
            self.runtime.set_adapters(list(loras.values()))
            self._loras = loras

    @property
    def loras(self) -> dict[str, float]:
        """Loaded LoRAs: name -> strength."""
        return {name: scale for name, (_, scale) in self._loras.items()}

    def _encode(self, prompts: tuple[str, ...], report: Report) -> list:
        """Features [1, S, D] per prompt: cached ones reused, the others encoded in one text-encoder call."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._features))
        if todo:
            ids, mask = tokenize(self.tokenizer, todo, self.text_config.max_length)
            encoded = self.runtime.encode(ids, mask)
            report.encoded = len(todo)
            for i, p in enumerate(todo):
                self._features[p] = encoded[i : i + 1]
        out = []
        for p in prompts:
            self._features.move_to_end(p)
            out.append(self._features[p])
        while len(self._features) > max(self.feature_cache, len(set(prompts))):
            self._features.popitem(last=False)
        return out

    def _image(self, pixels: np.ndarray, req: params.Request, inputs: Inputs, i: int) -> Image.Image:
        img = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
        meta = dict(prompt=req.prompts[i], style=req.style, seed=req.seeds[i], width=req.width, height=req.height,
                    steps=req.steps)
        if inputs.init is not None:
            meta["strength"] = inputs.strength  # reproducing it needs the same init_image
        about = dict(model=self.model, variant=self.variant, backend=self.backend, bonsai=__version__,
                     loras=self.loras, references=len(inputs.refs or ()), init_image=inputs.init is not None)
        img.info["bonsai"] = json.dumps({**meta, **about})
        for k, v in {**meta, **about}.items():
            img.info[f"bonsai_{k}"] = v if isinstance(v, (str, int, float)) or v is None else json.dumps(v)
        return img


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("render cancelled")


RENDER_KEYS = ("prompt", "style", "seed", "width", "height", "steps", "strength")


def metadata(image: Image.Image) -> dict:
    """The generation arguments stored in a bonsai PNG (`Image.open(path)`): `pipe(**metadata(img))` renders it
    again. `about(image)` gives what it was rendered with (model, variant, backend, bonsai version)."""
    meta = _stored(image)
    return {k: meta[k] for k in RENDER_KEYS if k in meta}


def about(image: Image.Image) -> dict:
    """Model, variant, backend and bonsai version stored in a bonsai PNG."""
    meta = _stored(image)
    return {k: meta[k] for k in meta if k not in RENDER_KEYS}


def _stored(image: Image.Image) -> dict:
    text = getattr(image, "text", None) or image.info
    if "bonsai" not in text:
        raise BonsaiValueError("this image has no bonsai metadata (a 'bonsai' PNG text chunk)")
    try:
        return json.loads(text["bonsai"])
    except json.JSONDecodeError:
        raise BonsaiValueError("this image's bonsai metadata is not valid JSON") from None


__all__ = ["Pipeline", "Result", "Report", "save_png", "metadata", "about"]
