"""LoRA files for the FLUX.2 [klein] transformer -> one validated low-rank record per target linear.

Key styles, as diffusers' Flux2LoraLoaderMixin.lora_state_dict reads them (loaders/lora_pipeline.py and the Flux2
converters in loaders/lora_conversion_utils.py):
- diffusers/PEFT: `transformer.<module>.lora_A.weight` / `.lora_B.weight` (`save_lora_weights`); the scale comes
  from the peft LoraConfig saved in the safetensors metadata (`lora_adapter_metadata`: lora_alpha / r, with
  alpha_pattern, rank_pattern, use_rslora), else 1.
- kohya: `lora_unet_<bfl module, dots as underscores>.lora_down.weight` / `.lora_up.weight` / `.alpha`;
  scale alpha / rank (alpha defaults to the rank).
- BFL names (ai-toolkit, ComfyUI, PEFT dumps): `diffusion_model.` or `base_model.model.` + `double_blocks.N...` /
  `single_blocks.N...` / `img_in` ..., or + diffusers module names; `lora_A`/`lora_B` or `lora_down`/`lora_up`.
A fused BFL qkv LoRA covers our three separate projections: the up rows split in thirds, the down shared, or, for a
block-diagonal up whose rank divides by 3, split too (diffusers' `_convert_to_ai_toolkit_cat`); the product is the
same either way. Beyond diffusers: a `.alpha` key is honoured in every style, bare diffusers module names are read,
and anything unknown is an error rather than a warning.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

import torch

from . import weights
from .config import KLEIN_4B, TransformerConfig
from .errors import BonsaiFileNotFoundError, BonsaiValueError
from .state import few

METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
PREFERRED_FILE = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes
PEFT_DEFAULT_R = PEFT_DEFAULT_ALPHA = 8  # peft.LoraConfig defaults, used when the metadata omits them

# Suffix -> part, per key style.
_SUFFIXES = {
    "diffusers": {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down",
                  ".lora.up.weight": "up", ".alpha": "alpha"},
    "kohya": {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"},
    "bfl": {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora_down.weight": "down",
            ".lora_up.weight": "up", ".alpha": "alpha"},
}
_PREFIXES = (("transformer.", "diffusers"), ("lora_unet_", "kohya"), ("diffusion_model.", "bfl"),
             ("base_model.model.", "bfl"))
_UNSUPPORTED = (("dora_scale", "DoRA"), ("lora_magnitude_vector", "DoRA"), (".lokr_", "LoKr"),
                (".hada_", "LoHa"), ("lora_B.bias", "a LoRA bias"), (".diff_b", "a full weight difference"),
                (".diff", "a full weight difference"))
_OTHER_MODELS = (("lora_te", "a text-encoder LoRA"), ("text_encoder", "a text-encoder LoRA"),
                 ("input_blocks", "an SD/SDXL UNet LoRA"), ("down_blocks", "an SD/SDXL UNet LoRA"),
                 ("mid_block", "an SD/SDXL UNet LoRA"))


@dataclass(frozen=True, eq=False)
class LoraLayer:
    """One target linear's low-rank update: W x + strength * scale * up @ (down @ x).

    down: float32 [rank, in]; up: float32 [out, rank]; scale: alpha / rank as stored in the file (1.0 without alpha).
    """

    down: torch.Tensor
    up: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense weight update scale * up @ down, float32 [out, in] (for merging into dense layers)."""
        return self.scale * (self.up @ self.down)


@dataclass(frozen=True, eq=False)
class Lora:
    """A LoRA read from `source` (its file): module name (diffusers key without `.weight`) -> LoraLayer.

    style: "diffusers", "kohya" or "bfl", the key style of the file.
    """

    source: str
    style: str
    layers: Mapping[str, LoraLayer]


def lora_targets(config: TransformerConfig = KLEIN_4B) -> dict[str, tuple[int, int]]:
    """Every linear of the transformer a LoRA may target: module name -> (out, in); the 100 low-bit ones first."""
    targets = dict(weights.lowbit_linears(config))
    for key, shape in weights.dense_tensors(config).items():
        if len(shape) == 2:
            targets[key.removesuffix(".weight")] = tuple(shape)
    return targets


def _bfl_modules(config: TransformerConfig) -> dict[str, tuple[str, ...]]:
    """BFL module names -> the diffusers modules they update (three for a fused qkv, in q, k, v order)."""
    m = {}
    for i in range(config.num_layers):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        m[f"{b}.img_attn.qkv"] = tuple(f"{t}.attn.{n}" for n in ("to_q", "to_k", "to_v"))
        m[f"{b}.txt_attn.qkv"] = tuple(f"{t}.attn.{n}" for n in ("add_q_proj", "add_k_proj", "add_v_proj"))
        for bfl, ours in (("img_attn.proj", "attn.to_out.0"), ("txt_attn.proj", "attn.to_add_out"),
                          ("img_mlp.0", "ff.linear_in"), ("img_mlp.2", "ff.linear_out"),
                          ("txt_mlp.0", "ff_context.linear_in"), ("txt_mlp.2", "ff_context.linear_out")):
            m[f"{b}.{bfl}"] = (f"{t}.{ours}",)
    for i in range(config.num_single_layers):
        m[f"single_blocks.{i}.linear1"] = (f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj",)
        m[f"single_blocks.{i}.linear2"] = (f"single_transformer_blocks.{i}.attn.to_out",)
    for bfl, ours in (("img_in", "x_embedder"), ("txt_in", "context_embedder"),
                      ("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
                      ("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
                      ("final_layer.linear", "proj_out"), ("final_layer.adaLN_modulation.1", "norm_out.linear"),
                      ("single_stream_modulation.lin", "single_stream_modulation.linear"),
                      ("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
                      ("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear")):
        m[bfl] = (ours,)
    return m


def _module_maps(config: TransformerConfig) -> dict[str, dict[str, tuple[str, ...]]]:
    """Per key style: the module name as written in a file -> the diffusers modules it updates."""
    targets = lora_targets(config)
    diffusers = {name: (name,) for name in targets}
    bfl = _bfl_modules(config)
    expanded = {**diffusers, **{"sformer_blocks." + n.removeprefix("transformer_blocks."): (n,)
                                for n in targets if n.startswith("transformer_blocks.")}}
    return {"diffusers": diffusers, "kohya": {"lora_unet_" + k.replace(".", "_"): v for k, v in bfl.items()},
            "bfl": {**bfl, **expanded}}


def _parse(key: str) -> tuple[str, str, str] | None:
    """key -> (style, module as written, part), or None for a key of no known style."""
    style, rest = "diffusers", key  # bare diffusers module names (diffusers itself ignores them)
    for prefix, s in _PREFIXES:
        if key.startswith(prefix):
            style, rest = s, key if s == "kohya" else key[len(prefix):]
            break
    for suffix, part in _SUFFIXES[style].items():
        if rest.endswith(suffix):
            return style, rest[: -len(suffix)], part
    return None


def lora_file(path: str | Path) -> Path:
    """A `.safetensors` file, or a folder holding one (`pytorch_lora_weights.safetensors` preferred) -> the file."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise BonsaiFileNotFoundError(f"LoRA {path} is neither a file nor a folder")
    # diffusers' _best_guess_weight_name skips these names (training leftovers).
    files = sorted(p for p in path.glob("*.safetensors")
                   if not any(s in p.name for s in ("scheduler", "optimizer", "checkpoint")))
    if (path / PREFERRED_FILE) in files:
        return path / PREFERRED_FILE
    if len(files) != 1:
        found = f"several: {few(p.name for p in files)}" if files else "none"
        raise BonsaiValueError(f"LoRA folder {path} must hold one .safetensors file, found {found}; pass the file")
    return files[0]


def _peft_scale(meta: dict, module: str, rank: int, source) -> float:
    """peft's LoraLayer scaling for `module` under the saved LoraConfig: alpha / r, or alpha / sqrt(r) (rsLoRA)."""
    def pattern_value(patterns: dict, default):
        for pattern, value in (patterns or {}).items():  # peft.utils.other.get_pattern_key: first match wins
            if re.match(rf"(.*\.)?({pattern})$", module):
                return value
        return default

    r = pattern_value(meta.get("rank_pattern"), meta.get("r", PEFT_DEFAULT_R))
    alpha = pattern_value(meta.get("alpha_pattern"), meta.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    if r != rank:
        raise BonsaiValueError(f"{source}: {module} has rank {rank}, but the saved LoraConfig says r={r}")
    return float(alpha) / (math.sqrt(r) if meta.get("use_rslora") else r)


def _peft_metadata(raw: dict | None, source) -> dict | None:
    """The transformer's LoraConfig from safetensors metadata, as diffusers' load_lora_adapter filters it."""
    if not raw or METADATA_KEY not in raw:
        return None
    try:
        meta = json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise BonsaiValueError(f"{source}: metadata {METADATA_KEY!r} is not valid JSON: {e}") from None
    meta = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
    if meta.get("use_dora") or meta.get("lora_bias"):
        raise BonsaiValueError(f"{source}: DoRA and LoRA biases are not supported (use_dora/lora_bias in metadata)")
    return meta or None


def _split_fused(down: torch.Tensor, up: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A LoRA on a fused [q; k; v] projection -> one (down, up) per part, with the same products."""
    rank, dims = down.shape[0], up.shape[0] // n
    if rank % n == 0:
        r = rank // n
        blocks = [up[j * dims:(j + 1) * dims, k * r:(k + 1) * r] for j in range(n) for k in range(n) if j != k]
        if all(not b.any() for b in blocks):  # block-diagonal: each part only uses its own rank slice
            return [(down[j * r:(j + 1) * r], up[j * dims:(j + 1) * dims, j * r:(j + 1) * r]) for j in range(n)]
    return [(down, up[j * dims:(j + 1) * dims]) for j in range(n)]


def convert_lora(state: Mapping[str, torch.Tensor], config: TransformerConfig = KLEIN_4B, source="LoRA",
                 metadata: Mapping[str, str] | None = None) -> Lora:
    """A LoRA state dict (any supported key style) -> Lora, everything validated before anything is returned.

    metadata: the safetensors header metadata (for diffusers' `lora_adapter_metadata`). Raises BonsaiValueError
    naming `source` and the first offending keys for: unknown keys, another model's LoRA, mixed key styles,
    unsupported adapters (DoRA, LoKr, LoHa, biases), a missing down/up, wrong ranks or shapes, non-finite values.
    """
    if not state:
        raise BonsaiValueError(f"{source}: holds no tensors")
    for marker, what in _UNSUPPORTED:
        hits = [k for k in state if (k.endswith(marker) if marker.startswith(".diff") else marker in k)]
        if hits:
            raise BonsaiValueError(f"{source}: {what} is not supported, only plain LoRA: {few(hits)}")
    maps = _module_maps(config)
    groups: dict[tuple[str, str], dict[str, tuple[str, torch.Tensor]]] = {}
    unknown = []
    for key, value in state.items():
        parsed = _parse(key)
        if parsed is None or parsed[1] not in maps[parsed[0]]:
            unknown.append(key)
            continue
        style, module, part = parsed
        group = groups.setdefault((style, module), {})
        if part in group:
            raise BonsaiValueError(f"{source}: {group[part][0]} and {key} are the same {part} of {module}")
        group[part] = (key, value)
    if not groups:
        hint = next((what for marker, what in _OTHER_MODELS if any(marker in k for k in unknown)), None)
        what = f"looks like {hint}" if hint else f"has keys {few(sorted(unknown), 4)}"
        raise BonsaiValueError(
            f"{source}: not a LoRA for the FLUX.2 [klein] transformer: no transformer keys; it {what}")
    if unknown:
        raise BonsaiValueError(f"{source}: keys match no layer of the FLUX.2 [klein] transformer "
                               f"({config.num_layers}+{config.num_single_layers} blocks): {few(sorted(unknown))}")
    styles = sorted({s for s, _ in groups})
    if len(styles) > 1:
        raise BonsaiValueError(f"{source}: mixes LoRA key styles {styles}; one file must use one style")
    style = styles[0]
    meta = _peft_metadata(metadata, source) if style == "diffusers" else None
    targets = lora_targets(config)

    layers = {}
    for (_, module), parts in sorted(groups.items()):
        missing = [p for p in ("down", "up") if p not in parts]
        if missing:
            key = next(iter(parts.values()))[0]
            raise BonsaiValueError(f"{source}: {module} has no {' and no '.join(missing)} weight (next to {key})")
        (down_key, down), (up_key, up) = parts["down"], parts["up"]
        for key, t in parts.values():
            if not t.is_floating_point():
                raise BonsaiValueError(f"{source}: {key} must be a float tensor, got {t.dtype}")
            if not torch.isfinite(t).all():
                raise BonsaiValueError(f"{source}: {key} has non-finite values")
        names = maps[style][module]
        out = sum(targets[n][0] for n in names)
        k = targets[names[0]][1]
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1] or down.shape[0] < 1:
            raise BonsaiValueError(f"{source}: {down_key} {tuple(down.shape)} and {up_key} {tuple(up.shape)} must "
                                   f"be [rank, in] and [out, rank] with the same rank")
        if down.shape[1] != k or up.shape[0] != out:
            raise BonsaiValueError(f"{source}: {module} is a LoRA for [out={up.shape[0]}, in={down.shape[1]}], but "
                                   f"{' + '.join(names)} is [out={out}, in={k}]")
        rank = down.shape[0]
        scale = 1.0
        if "alpha" in parts:
            alpha_key, alpha = parts["alpha"]
            if alpha.numel() != 1:
                raise BonsaiValueError(f"{source}: {alpha_key} must hold one number, got shape {tuple(alpha.shape)}")
            scale = float(alpha) / rank
        down, up = down.float(), up.float()
        pieces = [(down, up)] if len(names) == 1 else _split_fused(down, up, len(names))
        for name, (d, u) in zip(names, pieces):
            if name in layers:
                raise BonsaiValueError(f"{source}: {name} is updated twice (by {module} and another module)")
            s = _peft_scale(meta, name, d.shape[0], source) if meta is not None and "alpha" not in parts else scale
            layers[name] = LoraLayer(d.contiguous(), u.contiguous(), s)
    return Lora(str(source), style, MappingProxyType(dict(sorted(layers.items()))))


def read_lora(path: str | Path, config: TransformerConfig = KLEIN_4B) -> Lora:
    """A LoRA `.safetensors` file or a folder holding one -> Lora for a transformer of `config` (see convert_lora)."""
    from safetensors import SafetensorError, safe_open

    file = lora_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata()
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise BonsaiValueError(f"{file}: not a readable safetensors file: {e}") from None
    return convert_lora(state, config, file, metadata)
