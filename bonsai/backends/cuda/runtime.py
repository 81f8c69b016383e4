"""CUDA runtime: the torch runtime on a CUDA device with CUDA low-bit linears (our fast path or gemlite)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from ..torch.runtime import TorchRuntime
from . import choice
from .linear import LINEARS, FastInt4Linear, make_linear_factory, release_scratch, scratch_buffers

log = logging.getLogger(__name__)

__all__ = ["CudaRuntime", "LINEARS"]


def _gemlite_dirs(folder: Path) -> list[Path]:
    from ...layouts import GEMLITE

    return [folder / d for d in GEMLITE.dirs if (folder / d).is_dir()]


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
    def load(cls, folder, device=None, dtype=None, linear: str = "auto", activations: str | None = None,
             text_encoder: str = "4bit", keep_text_encoder: bool = False, autotune_file: str | Path | None = None,
             cuda_graphs: bool = True, compile: bool = False, **options):
        """linear: "auto" (per shape, the faster of "expand" and "fused", measured once and cached), "expand"
        (Triton expand + cuBLAS), "fused" (our Triton GEMM unpacking in the K loop) or "gemlite".
        dtype: bf16 (default) or fp16. activations="fp8": e4m3 activations per token and 128-group into our
        fp8 GEMMs (opt-in; not with gemlite). text_encoder: "4bit" keeps the HQQ pack's linears 4-bit on the GPU
        (expanded per layer for cuBLAS); "dense" dequantizes them to bf16 (the other packs are always dense).

        With "gemlite", a released gemlite repo loads as stored and its `gemlite_autotune.json` is honoured;
        tuned configs are persisted per GPU model under the user cache (`autotune_file` overrides the path).
        Our per-shape GEMM choices are persisted next to them (`choice.cache_path()`).
        cuda_graphs: replay one captured transformer forward per input shape (removes the CPU launch cost of
        ~1k small kernels per step). compile: torch.compile each transformer block (fuses the elementwise work).
        """
        if not torch.cuda.is_available():
            raise RuntimeError("CudaRuntime needs a CUDA device; torch.cuda.is_available() is False")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise ValueError(f"CudaRuntime runs on a cuda device, got {device}")
        dtype = dtype or torch.bfloat16
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        make_linear = make_linear_factory(linear, activations)  # validates linear and activations
        if text_encoder not in ("4bit", "dense"):
            raise ValueError(f"text_encoder must be '4bit' or 'dense', got {text_encoder!r}")
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
        else:
            choice.load(choice.cache_path())
        if linear == "gemlite" and _gemlite_dirs(folder):
            from ... import weights
            from ..torch.vae import load_vae_decoder

            transformer = _load_gemlite_transformer(folder, device, dtype)
            vae_config, vae_state = weights.read_vae(folder)
            vae = load_vae_decoder(vae_state, vae_config, device=device, dtype=dtype)
            rt = cls(folder, transformer, vae, device, dtype, options.get("layers", _default_layers()),
                     keep_text_encoder)
        else:
            rt = super().load(folder, device=device, dtype=dtype, make_linear=make_linear,
                              keep_text_encoder=keep_text_encoder, **options)
        rt.linear, rt.activations, rt.text_encoder = linear, activations, text_encoder
        rt._choices_saved = len(choice.table())
        rt.autotune_file = tune
        rt.configure(cuda_graphs=cuda_graphs, compile=compile)
        torch.cuda.synchronize(device)
        rt.load_seconds = time.perf_counter() - t0
        rt.resident_gb = torch.cuda.memory_allocated(device) / 1e9
        return rt

    def _load_text_encoder(self):
        from ... import weights

        if (self._text_encoder is None and getattr(self, "text_encoder", "dense") == "4bit"
                and weights.find_text_encoder(self.folder)[0] == "hqq"):
            from ..torch.text_encoder import load_text_encoder

            config, state = weights.read_text_encoder(self.folder, layers=max(self.layers), dtype=self.dtype,
                                                      packed=True, device=self.device)
            self._text_encoder = load_text_encoder(config, state, device=self.device, dtype=self.dtype,
                                                   layers=self.layers, make_linear=FastInt4Linear)
        return super()._load_text_encoder()

    def configure(self, cuda_graphs: bool = True, compile: bool = False) -> None:
        """Set the denoise-loop execution options (see `load`); drops captured graphs."""
        self.cuda_graphs = bool(cuda_graphs)
        self._graphs = {}
        self._graph_pool = None
        if compile and not getattr(self, "compiled", False):
            # Blocks of one class share their compiled code: parameters are graph inputs, not constants.
            for block in list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks):
                block.compile()
            self.compiled = True

    def _graphed_forward(self, x, features, img_ids, txt_ids) -> "GraphedForward":
        key = (tuple(x.shape), tuple(features.shape), tuple(img_ids.shape), tuple(txt_ids.shape))
        graphed = self._graphs.get(key)
        if graphed is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
            graphed = self._graphs[key] = GraphedForward(self.transformer, x, features, img_ids, txt_ids,
                                                         pool=self._graph_pool)
        graphed.set_context(features, img_ids, txt_ids)
        return graphed

    @torch.inference_mode()
    def denoise(self, noise, features, sigmas, img_ids, txt_ids, callback=None) -> torch.Tensor:
        """Euler flow matching like TorchRuntime.denoise; with cuda_graphs, each step replays a captured forward."""
        if not getattr(self, "cuda_graphs", False):
            x = super().denoise(noise, features, sigmas, img_ids, txt_ids, callback)
            self._save_choices()
            return x
        x = noise.to(self.device, self.dtype)
        features = features.to(self.device, self.dtype)
        run = self._graphed_forward(x, features, img_ids, txt_ids)
        sig = torch.as_tensor(sigmas, dtype=torch.float32)
        timesteps = sig[:-1] * 1000
        for i in range(len(sigmas) - 1):
            t = timesteps[i].expand(x.shape[0]).to(self.device, self.dtype) / 1000
            v = run(x, t)
            # Step in fp32 then cast back, as FlowMatchEulerDiscreteScheduler.step does.
            x = (x.float() + (sig[i + 1] - sig[i]).to(self.device) * v.float()).to(self.dtype)
            if callback is not None:
                callback(i, x)
        self._save_choices()
        return x

    def _save_choices(self) -> None:
        """Persist our per-shape GEMM choices when this render measured new ones (the next process skips that)."""
        if len(choice.table()) > getattr(self, "_choices_saved", 0):
            choice.save(choice.cache_path())
            self._choices_saved = len(choice.table())

    @torch.inference_mode()
    def warmup(self, sizes=((1024, 1024),), text_tokens: int = 512) -> dict[tuple[int, int], float]:
        """One denoise step per (height, width), so Triton JIT, our GEMM choice and gemlite autotuning happen now
        rather than in the first image; persists the tuned configs and choices. Returns seconds per size."""
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
        """Drop captured graphs, the shared expand scratch (re-made on the next call) and cached allocator blocks."""
        self._graphs = {}
        self._graph_pool = None
        release_scratch()
        torch.cuda.empty_cache()


class GraphedForward:
    """One CUDA graph of `transformer(x, features, t, img_ids, txt_ids)` for fixed shapes; call(x, t) replays it.

    The RoPE tables are built outside the graph (the model builds them on the host) and fed as static buffers.
    """

    def __init__(self, model, x, features, img_ids, txt_ids, pool=None):
        device = x.device
        self.model = model
        self.x, self.c = x.clone(), features.clone()
        self.t = torch.zeros(x.shape[0], device=device, dtype=x.dtype)
        self.img, self.txt = img_ids.clone(), txt_ids.clone()
        self.rope = model.rope(img_ids, txt_ids, device).clone()
        with _static_rope(model, self.rope):
            # Eager warmup on a side stream first: Triton JIT, gemlite autotuning and the expand scratch all
            # allocate or synchronize, which a capture must not do.
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                model(self.x, self.c, self.t, self.img, self.txt)
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.out = model(self.x, self.c, self.t, self.img, self.txt)
        # The kernels were captured against these scratch buffers: keep them alive even if the shared scratch
        # is released or regrown later.
        self.scratch = scratch_buffers()

    def set_context(self, features, img_ids, txt_ids) -> None:
        self.c.copy_(features)
        if not (torch.equal(img_ids.cpu(), self.img.cpu()) and torch.equal(txt_ids.cpu(), self.txt.cpu())):
            self.img.copy_(img_ids)
            self.txt.copy_(txt_ids)
            self.rope.copy_(self.model.rope(img_ids, txt_ids, self.x.device))

    def __call__(self, x, t) -> torch.Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        self.graph.replay()
        return self.out


class _static_rope:
    """Make `model.rope(...)` return fixed tensors for the duration of a capture."""

    def __init__(self, model, rope):
        self.model, self.rope = model, rope

    def __enter__(self):
        self.model.rope = lambda *args, **kwargs: self.rope

    def __exit__(self, *exc):
        del self.model.rope


def _default_layers():
    from ...prompt import FEATURE_LAYERS

    return FEATURE_LAYERS
