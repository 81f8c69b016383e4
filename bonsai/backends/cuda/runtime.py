"""CUDA runtime: the torch runtime on a CUDA device with CUDA low-bit linears (our fast path or gemlite), each
transformer forward replayed from a CUDA graph captured once per input shape."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ... import latents as L
from ... import layouts, weights
from ...config import TextEncoderConfig
from ...errors import BonsaiFileNotFoundError, BonsaiValueError
from ..torch.linear import dense_linear
from ..torch.runtime import (Cond, LazyModel, TorchRuntime, read_transformer, read_vae_decoder, text_encoder_loader,
                             vae_encoder_loader)
from ..torch.text_encoder import TORCH_TEXT_OPS, TextOps
from ..torch.text_encoder import encode as encode_text
from ..torch.transformer import TORCH_OPS, Ops, load_transformer
from ..torch.vae import TORCH_VAE_OPS, VaeOps, tiles
from . import choice
from .choice import GemmChoices
from .elementwise import (add_rms_norm, attention, conv_bias_add, conv_group_norm_silu, gated_add, group_norm_silu,
                          join_swiglu, modulate, rms_norm, rms_norm_rope, silu_mul, swiglu, text_norm_rope,
                          upsample_nearest)
from .linear import LINEARS, FastInt4Linear, Workspace, make_linear_factory, workspaces

log = logging.getLogger(__name__)

__all__ = ["CudaRuntime", "LINEARS"]

LINEARS = (*LINEARS, "dense")  # "dense": the codes expanded to bf16 at load (the dense baseline)

LOW_MEMORY_BYTES = 12 << 30  # memory="auto" picks "low" below this much device memory

# elementwise="triton": the LayerNorm + modulation, the QK RMSNorm + RoPE, the SwiGLUs and the gated residuals as
# one Triton pass each
TRITON_OPS = Ops(modulate=modulate, norm_rope=rms_norm_rope, swiglu=swiglu, join_swiglu=join_swiglu,
                 gated_add=gated_add)


# elementwise="triton": the text encoder's RMSNorms (the residual add folded into the second), its QK norm + RoPE +
# head repeat and its SiLU-gated product as one Triton pass each
TRITON_TEXT_OPS = TextOps(rms_norm=rms_norm, add_rms_norm=add_rms_norm, norm_rope=text_norm_rope,
                          silu_mul=silu_mul)


def vae_norm_act(norm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """The VAE's GroupNorm (+ SiLU) as Triton passes over the activation (`group_norm_silu`)."""
    return group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, silu)


# elementwise="triton": the VAE's GroupNorm + SiLU, its convs' bias adds (folded into the norm or the residual add
# after them) and the upsampling as Triton passes over channels_last activations; its attention as cuBLAS GEMMs
# around a Triton softmax
TRITON_VAE_OPS = VaeOps(norm_act=vae_norm_act, conv=conv_bias_add, conv_norm_act=conv_group_norm_silu,
                        conv_add=conv_bias_add, upsample=upsample_nearest, attention=attention)


def _lap(t0: float, phases: dict | None = None) -> float:
    """Seconds since t0 minus the phases already counted."""
    return time.perf_counter() - t0 - sum((phases or {}).values())


def _tensors(model):
    return itertools.chain(model.named_parameters(), model.named_buffers())


def _to_pinned_host(model, host, refresh: bool = True):
    """Point a model's parameters and buffers at pinned host copies -> (model, copies by name). The pinned buffers
    of the last call are reused (pinning is slow; copying back from them runs at full PCIe speed, no disk read).
    refresh: copy the values again (a transformer's tensors change with its LoRA branches); False for a model whose
    weights never change, whose first copies stay valid."""
    copies = host[1] if host is not None else {}
    for name, t in _tensors(model):
        c = copies.get(name)
        if c is None or c.shape != t.shape or c.dtype != t.dtype:
            c = copies[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            c.copy_(t.data, non_blocking=True)
        elif refresh:
            c.copy_(t.data, non_blocking=True)
        t.data = c
    torch.cuda.synchronize()
    return model, copies


def _to_device(host, device):
    model, copies = host
    for name, t in _tensors(model):
        t.data = copies[name].to(device, non_blocking=True)
    torch.cuda.synchronize(device)
    return model


def _load_gemlite_transformer(folder: Path, device, dtype, ops):
    """A released gemlite repo straight into gemlite layers: the stored W_q/scales/zeros, no repacking."""
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
    return load_transformer(tensors, config, device=device, dtype=dtype, make_linear=gemlite.make_gemlite_linear,
                            ops=ops)


class CudaRuntime(TorchRuntime):
    """TorchRuntime with CUDA linears; attention goes through torch SDPA (flash / cuDNN kernels on Hopper)."""

    name = "cuda"

    def __init__(self, transformer, vae, text_encoder: LazyModel, text_config: TextEncoderConfig, device, dtype,
                 vae_encoder: LazyModel, *, linear: str, activations: str | None, memory: str, cuda_graphs: bool,
                 vae_tile: bool | None, auto_residency: bool, workspace: Workspace, choices: GemmChoices,
                 autotune_file: Path | None, load_report: dict[str, float]):
        super().__init__(transformer, vae, text_encoder, text_config, device, dtype, vae_encoder, vae_tile=vae_tile,
                         auto_residency=auto_residency)
        self.linear, self.activations, self.memory = linear, activations, memory
        self.cuda_graphs = cuda_graphs
        self.workspace, self.choices = workspace, choices  # shared by every fast linear of this runtime
        self.autotune_file = autotune_file
        self.load_report = load_report  # seconds per loading phase
        self.resident_gb = torch.cuda.memory_allocated(self.device) / 1e9
        self._graphs: dict[tuple, GraphedForward | GraphedDecoder] = {}
        self._graph_pool = None
        self._encoder_graphs: dict[tuple, GraphedEncoder] = {}  # valid while the text encoder stays resident
        # memory="low": the transformer waits in pinned host memory while the text encoder runs (gemlite's layers
        # keep device state outside their parameters, so they stay)
        self._offload_transformer = memory == "low" and linear != "gemlite"
        self._transformer_host = None

    @classmethod
    def load(cls, folder, device=None, dtype=None, text_config: TextEncoderConfig = TextEncoderConfig(),
             linear: str = "auto", activations: str | None = None, text_encoder: str = "4bit",
             keep_text_encoder: bool | str = "auto", memory: str = "auto", autotune_file: str | Path | None = None,
             cuda_graphs: bool | None = None, compile: bool = False, elementwise: str = "triton") -> "CudaRuntime":
        """linear: "auto" (per shape, the faster of "expand" and "fused", measured once and cached), "expand"
        (Triton expand + cuBLAS), "fused" (our Triton GEMM unpacking in the K loop), "gemlite", or "dense" (the
        codes expanded to bf16 at load: the dense baseline, 5x the weight memory).
        dtype: bf16 (default) or fp16. activations="fp8": e4m3 activations per token and 128-group into
        cuBLAS's block-scaled fp8 GEMM over the exact codes (Hopper) or our fused fp8 GEMM (opt-in; not with
        gemlite). text_encoder: "4bit" keeps the HQQ pack's linears 4-bit on the GPU
        (expanded per layer for cuBLAS); "dense" dequantizes them to bf16 (the other packs are always dense).
        keep_text_encoder: "auto" keeps the text encoder on the GPU between prompts while the render has room
        next to it (else it moves to pinned host memory and comes back without a disk read); True / False.
        memory: "low" (for 6-8 GB cards: the text encoder and the transformer (our linears) take turns on the
        device, each waiting in pinned host memory while the other runs; tiled VAE decode; no CUDA graphs),
        "normal", or "auto" (low below 12 GB of device memory).

        With "gemlite", a released gemlite repo loads as stored and its `gemlite_autotune.json` is honoured;
        tuned configs are persisted per GPU model under the user cache (`autotune_file` overrides the path).
        Our per-shape GEMM choices are persisted next to them (`choice.cache_path()`).
        cuda_graphs: replay one captured transformer forward per input shape (removes the CPU launch cost of
        ~1k small kernels per step), one text-encoder forward per prompt-batch shape while the encoder stays
        on the GPU, and one untiled VAE decode per image size; default on, off with memory="low".
        elementwise: "triton" runs the LayerNorm + modulation, the QK RMSNorm + RoPE, the SwiGLUs, the gated
        residuals, the VAE's GroupNorm + SiLU (with the VAE channels_last) and the text encoder's RMSNorms, QK
        norm + RoPE and SiLU-gated product as our Triton kernels (`elementwise.py`); "torch" as the torch ops of
        the reference backend.
        compile: torch.compile the torch elementwise steps instead (modulation, norm + RoPE, attention, SwiGLUs,
        gated residuals; the linears stay eager).
        """
        if not torch.cuda.is_available():
            raise RuntimeError("CudaRuntime needs a CUDA device; torch.cuda.is_available() is False")
        device = torch.device(device or "cuda")
        if device.type != "cuda":
            raise BonsaiValueError(f"CudaRuntime runs on a cuda device, got {device}")
        dtype = dtype or torch.bfloat16
        if dtype not in (torch.bfloat16, torch.float16):
            raise BonsaiValueError(f"dtype must be torch.bfloat16 or torch.float16, got {dtype}")
        workspace, choices = Workspace(device), GemmChoices()
        if linear == "dense":
            if activations is not None:
                raise BonsaiValueError("activations='fp8' needs a low-bit linear, not linear='dense'")
            make_linear = dense_linear
        else:  # validates linear and activations
            make_linear = make_linear_factory(linear, activations, workspace=workspace, choices=choices)
        if text_encoder not in ("4bit", "dense"):
            raise BonsaiValueError(f"text_encoder must be '4bit' or 'dense', got {text_encoder!r}")
        if keep_text_encoder not in (True, False, "auto"):
            raise BonsaiValueError(f"keep_text_encoder must be True, False or 'auto', got {keep_text_encoder!r}")
        if memory not in ("auto", "normal", "low"):
            raise BonsaiValueError(f"memory must be 'auto', 'normal' or 'low', got {memory!r}")
        if memory == "auto":
            memory = "low" if torch.cuda.get_device_properties(device).total_memory < LOW_MEMORY_BYTES else "normal"
        low = memory == "low"
        folder = Path(folder)
        if not folder.is_dir():
            raise BonsaiFileNotFoundError(f"model folder {folder} does not exist")
        if elementwise not in ("triton", "torch"):
            raise BonsaiValueError(f"elementwise must be 'triton' or 'torch', got {elementwise!r}")
        ops = TRITON_OPS if elementwise == "triton" else TORCH_OPS
        if compile:
            ops = Ops(**{f.name: torch.compile(getattr(TORCH_OPS, f.name), dynamic=False)
                         for f in dataclasses.fields(Ops)})
        phases, t0 = {}, time.perf_counter()
        tune = None
        if linear == "gemlite":
            from . import gemlite

            # Released tuned configs first, then ours on top (ours were measured on this GPU model).
            for f in sorted(folder.glob(f"transformer*/{layouts.GEMLITE_AUTOTUNE_FILE}")):
                gemlite.load_autotune(f)
            tune = Path(autotune_file) if autotune_file else gemlite.autotune_cache_path()
            gemlite.load_autotune(tune)
        else:
            choices.load(choice.cache_path())
        phases["tuning caches"] = _lap(t0)
        if linear == "gemlite" and weights.find_transformer(folder)[0] == "gemlite":
            transformer = _load_gemlite_transformer(folder, device, dtype, ops)
        else:
            transformer = read_transformer(folder, device, dtype, make_linear, ops)
        torch.cuda.synchronize(device)
        phases["transformer"] = _lap(t0, phases)
        vae = read_vae_decoder(folder, device, dtype, TRITON_VAE_OPS if elementwise == "triton" else TORCH_VAE_OPS)
        if elementwise == "triton":  # cuDNN convolves NHWC natively: no layout transposes around each conv
            vae = vae.to(memory_format=torch.channels_last)
        torch.cuda.synchronize(device)
        phases["vae"] = _lap(t0, phases)
        packed_te = text_encoder == "4bit" and weights.find_text_encoder(folder)[0] == "hqq"
        load_te = text_encoder_loader(folder, text_config, device, dtype,
                                      functools.partial(FastInt4Linear, workspace=workspace) if packed_te else None,
                                      TRITON_TEXT_OPS if elementwise == "triton" else TORCH_TEXT_OPS)
        te = LazyModel(load_te, keep=not low and keep_text_encoder is not False, free=torch.cuda.empty_cache,
                       offload=functools.partial(_to_pinned_host, refresh=False),
                       restore=lambda host: _to_device(host, device))
        return cls(transformer, vae, te, text_config, device, dtype, vae_encoder_loader(folder, device, dtype),
                   linear=linear, activations=activations,
                   memory=memory, cuda_graphs=not low if cuda_graphs is None else bool(cuda_graphs),
                   vae_tile=True if low else None, auto_residency=not low and keep_text_encoder == "auto",
                   workspace=workspace, choices=choices, autotune_file=tune, load_report=phases)

    def set_adapters(self, adapters) -> None:
        super().set_adapters(adapters)
        # The graphs replay the modules they captured; their pool goes with them (a freed pool is not reusable).
        # The VAE's go too (they share the pool) and are captured again on the next decode.
        self._graphs.clear()
        self._graph_pool = None

    @torch.inference_mode()
    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if not self._offload_transformer:
            return super().encode(input_ids, attention_mask)
        self._transformer_host = _to_pinned_host(self.transformer, self._transformer_host)
        torch.cuda.empty_cache()  # a small card needs the transformer's blocks for the text encoder's
        try:
            return super().encode(input_ids, attention_mask)
        finally:
            _to_device(self._transformer_host, self.device)

    def text_encoder_call(self):
        """With CUDA graphs and a kept text encoder: one graph per [B, S] replays its forward (eager, it is
        launch-bound: tens of small kernels per layer for little GPU work)."""
        if not (self.cuda_graphs and self.text_encoder.keep):
            return super().text_encoder_call()
        if not self.text_encoder.resident:
            self._encoder_graphs.clear()  # captured against tensors that have gone since
        model = self.text_encoder.get()

        def run(ids, mask):
            key = tuple(ids.shape)
            if key not in self._encoder_graphs:
                self._encoder_graphs[key] = GraphedEncoder(model, key, self.text_config.feature_layers, self.device)
            return self._encoder_graphs[key](ids, mask)

        return run

    @torch.inference_mode()
    def condition(self, features, img_ids, txt_ids, refs=None):
        """Eager: features and RoPE on the device. With CUDA graphs: the graph captured for these shapes (once,
        on first use), its static inputs set to this batch; valid until the next `condition` of the same shapes."""
        cond = super().condition(features, img_ids, txt_ids, refs)
        if not self.text_encoder.resident:
            self._encoder_graphs.clear()  # the text encoder made room for this render: its graphs' memory too
        if not self.cuda_graphs:
            return cond
        x_shape = (cond.features.shape[0], img_ids.shape[-2], self.transformer.config.in_channels)
        key = (x_shape, tuple(cond.features.shape), tuple(cond.rope.shape))
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = self._graphs[key] = GraphedForward(self.transformer, x_shape, cond, self.dtype,
                                                         pool=self._pool())
            self._save_tuning()
        graphed.set_context(cond)
        return graphed

    @torch.inference_mode()
    def velocity(self, x: torch.Tensor, timestep: float, cond) -> torch.Tensor:
        if isinstance(cond, GraphedForward):
            return cond(x, timestep)
        return super().velocity(x, timestep, cond)

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int):
        """With CUDA graphs: one graph per latents shape and image size replays the untiled decode (eager, it is
        launch-bound: 10.4 ms for 5.3 ms of GPU work at 512x512 on the H200); tiled decodes run eagerly."""
        self._save_tuning()  # eager renders measure GEMM choices in their first steps
        if not self.cuda_graphs or tiles(2 * max(L.latent_size(height, width)), self.vae_tile):
            return super().decode(latents, height, width)
        key = ("decode", tuple(latents.shape), height, width)
        graphed = self._graphs.get(key)
        if graphed is None:
            graphed = self._graphs[key] = GraphedDecoder(self.vae, tuple(latents.shape), height, width, self.dtype,
                                                         self.device, pool=self._pool())
        return graphed(latents)

    def _pool(self):
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()  # one pool: graphs never run concurrently
        return self._graph_pool

    def _save_tuning(self) -> None:
        """Persist new per-shape GEMM choices and gemlite configs, so that the next process skips measuring."""
        if self.choices.unsaved:
            self.choices.save(choice.cache_path())
        if self.linear == "gemlite" and self.autotune_file is not None:
            from . import gemlite

            gemlite.save_autotune(self.autotune_file)

    def memory_report(self) -> dict:
        """GPU memory in GB (resident after load, allocated now, peak since the last reset), the memory mode and
        whether the text encoder is on the GPU."""
        return dict(resident_gb=self.resident_gb, memory=self.memory,
                    text_encoder_resident=self.text_encoder.resident, **super().memory_report())

    def release(self) -> None:
        """Drop captured graphs, the shared expand scratch (re-made on the next call) and cached allocator blocks."""
        self._graphs.clear()
        self._graph_pool = None
        self._encoder_graphs.clear()
        self.workspace.release()
        torch.cuda.empty_cache()


def _capture(model, fn, device, pool=None):
    """fn() (a forward of `model`) run once eagerly on a side stream, then captured -> (graph, its output, the
    workspace buffers it was captured against)."""
    # The eager run first: Triton JIT, GEMM choices, gemlite autotuning and the expand scratch all allocate or
    # synchronize, which a capture must not do.
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    # Kept alive by the caller, so that a workspace released or regrown later does not free them under the graph.
    return graph, out, [buf for ws in workspaces(model) for buf in ws.buffers()]


class GraphedEncoder:
    """One CUDA graph of the resident text encoder for fixed [B, S]: `graphed(ids, mask)` -> features (a copy:
    the graph's output is overwritten by the next replay)."""

    def __init__(self, model, shape: tuple[int, int], layers, device):
        self.ids = torch.zeros(shape, dtype=torch.int64, device=device)
        self.mask = torch.ones(shape, dtype=torch.int64, device=device)
        self.graph, self.out, self.scratch = _capture(
            model, lambda: encode_text(model, self.ids, self.mask, layers), device)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.mask.copy_(mask)
        self.graph.replay()
        return self.out.clone()


class GraphedDecoder:
    """One CUDA graph of the untiled VAE decode for fixed latents [B, N, C] and image size: `graphed(latents)` ->
    uint8 pixels [B, H, W, 3] as a numpy array on the host."""

    def __init__(self, vae, shape: tuple[int, int, int], height: int, width: int, dtype: torch.dtype, device,
                 pool=None):
        self.latents = torch.randn(shape, device=device, dtype=dtype)
        self.graph, self.out, _ = _capture(vae, lambda: vae.pixels(self.latents, height, width, tile=False), device,
                                           pool)

    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        self.latents.copy_(latents)
        self.graph.replay()
        return self.out.cpu().numpy()


class GraphedForward:
    """One CUDA graph of the transformer forward for fixed shapes: `set_context` fills the static conditioning,
    `graphed(x, timestep)` replays it. Reference tokens, if any, sit in the static input after the latents."""

    def __init__(self, model, x_shape: tuple[int, int, int], cond: Cond, dtype: torch.dtype, pool=None):
        device = cond.features.device
        self.n = x_shape[1]
        n_refs = 0 if cond.refs is None else cond.refs.shape[1]
        # [B, N + M, C]; random, not zeros: the warmup measures GEMMs
        self.x = torch.randn(x_shape[0], self.n + n_refs, x_shape[2], device=device, dtype=dtype)
        self.t = torch.zeros(x_shape[0], device=device, dtype=dtype)
        self.features, self.rope = cond.features.clone(), cond.rope.clone()
        self.graph, self.out, self.scratch = _capture(
            model, lambda: model(self.x, self.features, self.t, rope=self.rope), device, pool)

    def set_context(self, cond: Cond) -> None:
        self.features.copy_(cond.features)
        self.rope.copy_(cond.rope)
        if cond.refs is not None:
            self.x[:, self.n:].copy_(cond.refs)

    def __call__(self, x: torch.Tensor, timestep: float) -> torch.Tensor:
        self.x[:, :self.n].copy_(x)
        self.t.fill_(timestep)
        self.graph.replay()
        return self.out[:, :self.n]
