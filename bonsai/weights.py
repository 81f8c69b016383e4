"""Readers of whole released Bonsai Image 4B folders: layout detection, strict key and value checks.

Every reader returns diffusers `Flux2Transformer2DModel` keys. The 100 big linears come back as `LowBitWeight`,
every other tensor dense. Assumptions the spec marks unverified are checked here and fail with a ValueError that
names the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import KLEIN_4B, TextEncoderConfig, TransformerConfig, VAEConfig, read_json
from .quant import LowBitWeight
from .quant.lowbit import BITS
from .quant.qwen4bit import hqq_to_dense, mlx4_to_dense

GROUP_SIZE = 128
LAYOUT_DIRS = {  # layout -> transformer folder names, in detection order
    "gemlite": ("transformer-gemlite-int2", "transformer-gemlite-int1"),
    "mlx": ("transformer-packed-mflux",),
    "compact": ("transformer-compact",),
    "unpacked": ("transformer",),
}
WEIGHT_FILES = {
    "gemlite": "state_dict.pt",
    "mlx": "diffusion_pytorch_model.safetensors",
    "compact": "model.safetensors",
    "unpacked": "diffusion_pytorch_model.safetensors",
}
TEXT_ENCODER_DIRS = {"hqq": "text_encoder-hqq-4bit", "mlx": "text_encoder-mlx-4bit", "dense": "text_encoder"}
GEMLITE_KEYS = ("W_q", "scales", "zeros", "metadata", "orig_shape")
COMPACT_FORMAT = "bonsai-compact"


# --- the key inventory ------------------------------------------------------------------------------------------


def lowbit_linears(config: TransformerConfig) -> dict[str, tuple[int, int]]:
    """The quantized linears: module name -> (out, in)."""
    d, f = config.inner_dim, config.mlp_hidden_dim
    shapes = {}
    for i in range(config.num_layers):
        p = f"transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            shapes[f"{p}.attn.{name}"] = (d, d)
        for ff in ("ff", "ff_context"):
            shapes[f"{p}.{ff}.linear_in"] = (2 * f, d)
            shapes[f"{p}.{ff}.linear_out"] = (d, f)
    for i in range(config.num_single_layers):
        p = f"single_transformer_blocks.{i}.attn"
        shapes[f"{p}.to_qkv_mlp_proj"] = (3 * d + 2 * f, d)
        shapes[f"{p}.to_out"] = (d, d + f)
    return shapes


def dense_tensors(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """Every other tensor of the transformer: key -> shape (9 linears and the QK-norm vectors)."""
    d, hd = config.inner_dim, config.attention_head_dim
    shapes = {
        "x_embedder.weight": (d, config.in_channels),
        "context_embedder.weight": (d, config.joint_attention_dim),
        "time_guidance_embed.timestep_embedder.linear_1.weight": (d, config.timestep_guidance_channels),
        "time_guidance_embed.timestep_embedder.linear_2.weight": (d, d),
        "double_stream_modulation_img.linear.weight": (6 * d, d),
        "double_stream_modulation_txt.linear.weight": (6 * d, d),
        "single_stream_modulation.linear.weight": (3 * d, d),
        "norm_out.linear.weight": (2 * d, d),
        "proj_out.weight": (config.out_dim, d),
    }
    for i in range(config.num_layers):
        for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            shapes[f"transformer_blocks.{i}.attn.{n}.weight"] = (hd,)
    for i in range(config.num_single_layers):
        for n in ("norm_q", "norm_k"):
            shapes[f"single_transformer_blocks.{i}.attn.{n}.weight"] = (hd,)
    return shapes


def pack_sizes(config: TransformerConfig = KLEIN_4B) -> dict[str, dict[str, int]]:
    """Bytes of the transformer tensors in each layout (headers and pickle overhead excluded)."""
    q = sum(o * i for o, i in lowbit_linears(config).values())
    groups = q // GROUP_SIZE
    dense16 = 2 * sum(int(torch.Size(s).numel()) for s in dense_tensors(config).values())
    sizes = {}
    for kind, bits in BITS.items():
        sizes[kind] = {
            "mlx": q * bits // 8 + 2 * 2 * groups + dense16,  # bf16 scales + biases
            "gemlite": q * bits // 8 + 2 * 4 * groups + dense16,  # fp32 scales + zeros
            "compact": (-(-q // 5) if kind == "ternary" else q // 8) + 2 * groups + dense16,  # 16-bit scales
            "unpacked": 2 * q + dense16,
        }
    return sizes


# --- transformer ------------------------------------------------------------------------------------------------


@dataclass
class TransformerWeights:
    config: TransformerConfig
    kind: str  # "ternary" | "binary"
    layout: str  # "gemlite" | "mlx" | "compact" | "unpacked"
    tensors: dict  # diffusers key -> LowBitWeight | torch.Tensor
    path: Path  # the transformer folder
    quant_config: dict = field(default_factory=dict)
    autotune_file: Path | None = None


def find_transformer(folder: str | Path, layout: str | None = None) -> tuple[str, Path]:
    """-> (layout, transformer folder). Packed layouts win over the dense `transformer/`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    layouts = [layout] if layout else list(LAYOUT_DIRS)
    if layout and layout not in LAYOUT_DIRS:
        raise ValueError(f"layout must be one of {list(LAYOUT_DIRS)}, got {layout!r}")
    for name in layouts:
        for sub in LAYOUT_DIRS[name]:
            if (folder / sub).is_dir():
                return name, folder / sub
    expected = ", ".join(d + "/" for name in layouts for d in LAYOUT_DIRS[name])
    raise FileNotFoundError(f"{folder} holds no transformer folder (expected one of {expected})")


def read_transformer(folder: str | Path, layout: str | None = None, device=None) -> TransformerWeights:
    """Read the transformer of a released (or compact) repo folder; see LAYOUT_DIRS for what is recognised.

    device: where the stored tensors are converted (a GPU unpacks and checks 4B codes in a fraction of the CPU's
    time); the result lives there.
    """
    layout, path = find_transformer(folder, layout)
    config = TransformerConfig.from_json(path / "config.json")
    reader = {"gemlite": _read_gemlite, "mlx": _read_mlx, "compact": _read_compact, "unpacked": _read_unpacked}[layout]
    kind, tensors, quant_config = reader(path, config, device)
    _check_keys(tensors, config, path / WEIGHT_FILES[layout])
    autotune = path / "gemlite_autotune.json"
    return TransformerWeights(config, kind, layout, tensors, path, quant_config,
                              autotune if autotune.is_file() else None)


def _check_keys(tensors: dict, config: TransformerConfig, source: Path) -> None:
    linears = {f"{k}.weight": v for k, v in lowbit_linears(config).items()}
    dense = dense_tensors(config)
    missing = sorted((set(linears) | set(dense)) - set(tensors))
    unexpected = sorted(set(tensors) - set(linears) - set(dense))
    if missing or unexpected:
        raise ValueError(f"{source}: keys do not match config.json; missing {_few(missing)}, unexpected "
                         f"{_few(unexpected)}")
    for key, value in tensors.items():
        want = linears.get(key) or dense[key]
        if tuple(value.shape) != tuple(want):
            raise ValueError(f"{source}: {key} has shape {tuple(value.shape)}, config.json implies {tuple(want)}")
        if key in dense and not isinstance(value, torch.Tensor):
            raise ValueError(f"{source}: {key} must be a dense tensor")
        if key in dense and not value.is_floating_point():
            raise ValueError(f"{source}: {key} must be a float tensor, got {value.dtype}")


def _few(keys: list[str], n: int = 6) -> str:
    return "[]" if not keys else f"{keys[:n]}{f' (+{len(keys) - n} more)' if len(keys) > n else ''}"


def read_quant_config(path: Path) -> dict:
    """A transformer folder's quantization_config.json, checked: bits 1 or 2, group_size 128, solver agrees."""
    file = path / "quantization_config.json"
    q = read_json(file)
    bits = q.get("bits", q.get("nbits"))
    group = q.get("group_size", q.get("groupSize", GROUP_SIZE))
    if bits not in (1, 2):
        raise ValueError(f"{file}: bits must be 1 (binary) or 2 (ternary), got {bits!r}")
    if group != GROUP_SIZE:
        raise ValueError(f"{file}: group_size must be {GROUP_SIZE}, got {group!r}")
    solver = q.get("solver")
    if solver is not None and (solver == "ternary") != (bits == 2):
        raise ValueError(f"{file}: solver {solver!r} disagrees with bits {bits}")
    return {**q, "bits": bits, "group_size": group}


def _kind(bits: int) -> str:
    return {b: k for k, b in BITS.items()}[bits]


def load_torch_file(file: Path) -> dict:
    """torch.load with weights_only=True (a pickle that needs code to load is refused), errors naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"missing {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle errors have many types; all mean the same to a user
        raise ValueError(f"{file}: cannot be read as a tensors-only torch file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: expected a dict of tensors, got {type(state).__name__}")
    return state


def read_gemlite_state(folder: str | Path) -> tuple[TransformerConfig, dict, dict]:
    """The released gemlite transformer as stored: (config, quantization_config, raw state dict)."""
    layout, path = find_transformer(folder, "gemlite")
    return TransformerConfig.from_json(path / "config.json"), read_quant_config(path), load_torch_file(
        path / WEIGHT_FILES[layout])


def _read_gemlite(path: Path, config: TransformerConfig, device=None):
    q = read_quant_config(path)
    kind = _kind(q["bits"])
    folder_bits = {"transformer-gemlite-int2": 2, "transformer-gemlite-int1": 1}[path.name]
    if folder_bits != q["bits"]:
        raise ValueError(f"{path}/quantization_config.json: bits {q['bits']} disagrees with the folder name")
    packing = q.get("packing_bitwidth", 8)
    wq_dtype = {8: torch.uint8, 32: torch.int32}.get(packing)
    if wq_dtype is None:
        raise ValueError(f"{path}/quantization_config.json: packing_bitwidth must be 8 or 32, got {packing!r}")
    file = path / WEIGHT_FILES["gemlite"]
    state = _to(load_torch_file(file), device)
    tensors, groups = {}, {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{file}: {key} is a {type(value).__name__}, expected a tensor")
        prefix, _, leaf = key.rpartition(".")
        if leaf in GEMLITE_KEYS:
            groups.setdefault(prefix, {})[leaf] = value
        elif leaf == "bias":
            raise ValueError(f"{file}: {key}: linear biases are not expected in a Bonsai transformer")
        else:
            tensors[key] = value
    for prefix, parts in groups.items():
        where = f"{file}: {prefix}"
        missing = [k for k in GEMLITE_KEYS if k not in parts]
        if missing:
            raise ValueError(f"{where} misses {missing}")
        if parts["W_q"].dtype != wq_dtype:
            raise ValueError(f"{where}.W_q is {parts['W_q'].dtype}, but packing_bitwidth {packing} means {wq_dtype}")
        md = parts["metadata"].flatten().tolist()
        if len(md) == 12 and (md[1] != q["bits"] or md[2] != q["group_size"]):
            raise ValueError(f"{where}.metadata says {md[1]}-bit group {md[2]}, quantization_config.json says "
                             f"{q['bits']}-bit group {q['group_size']}")
        tensors[f"{prefix}.weight"] = LowBitWeight.from_gemlite(**parts, name=f"{file}: {prefix}")
    return kind, tensors, q


def _to(state: dict, device) -> dict:
    return state if device is None else {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def _read_safetensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = [file]
    index = file.with_name(file.name + ".index.json")
    if not file.is_file() and index.is_file():
        files = sorted({file.with_name(f) for f in read_json(index)["weight_map"].values()})
    tensors = {}
    for f in files:
        if not f.is_file():
            raise FileNotFoundError(f"missing {f}")
        try:
            tensors.update(load_file(f))
        except Exception as e:
            raise ValueError(f"{f}: not a readable safetensors file ({e})") from None
    return tensors


def _read_mlx(path: Path, config: TransformerConfig, device=None):
    q = read_quant_config(path)
    file = path / WEIGHT_FILES["mlx"]
    raw = _to(_read_safetensors(file), device)
    tensors = {}
    linears = lowbit_linears(config)
    for key, value in raw.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in linears:
            if leaf in ("scales", "biases"):
                continue
            parts = {n: raw.get(f"{prefix}.{n}") for n in ("weight", "scales", "biases")}
            missing = [n for n, t in parts.items() if t is None]
            if missing:
                raise ValueError(f"{file}: {prefix} misses {missing}")
            bits = parts["weight"].shape[1] * 32 // linears[prefix][1]
            if bits != q["bits"]:
                raise ValueError(f"{file}: {prefix}.weight {tuple(parts['weight'].shape)} is {bits}-bit for in="
                                 f"{linears[prefix][1]}, quantization_config.json says {q['bits']}-bit")
            tensors[key] = LowBitWeight.from_mlx(**parts, bits=bits, group_size=q["group_size"],
                                                 name=f"{file}: {prefix}")
        else:
            tensors[key] = value
    return _kind(q["bits"]), tensors, q


def _read_compact(path: Path, config: TransformerConfig, device=None):  # converted on the CPU
    q = read_json(path / "quantization_config.json")
    file = path / WEIGHT_FILES["compact"]
    if q.get("format") != COMPACT_FORMAT or q.get("kind") not in BITS or q.get("group_size") != GROUP_SIZE:
        raise ValueError(f"{path}/quantization_config.json: expected format {COMPACT_FORMAT!r}, kind ternary|binary "
                         f"and group_size {GROUP_SIZE}, got {q}")
    kind = q["kind"]
    raw = _read_safetensors(file)
    linears = lowbit_linears(config)
    tensors = {}
    for key, value in raw.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix in linears:
            if leaf != "codes":
                continue
            if f"{prefix}.scales" not in raw:
                raise ValueError(f"{file}: {prefix} misses scales")
            tensors[f"{prefix}.weight"] = LowBitWeight.from_compact(
                value, raw[f"{prefix}.scales"], kind, linears[prefix][1], GROUP_SIZE, name=f"{file}: {prefix}")
        else:
            tensors[key] = value
    return kind, tensors, q


def _read_unpacked(path: Path, config: TransformerConfig, device=None):  # converted on the CPU
    """Dense diffusers transformer: each big linear must be exactly s * codes per group (packed losslessly)."""
    file = path / WEIGHT_FILES["unpacked"]
    raw = _read_safetensors(file)
    stated = _manifest_kind(path)
    linears = lowbit_linears(config)
    tensors, has_zero = {}, False
    for key, value in raw.items():
        if key.removesuffix(".weight") not in linears:
            tensors[key] = value
            continue
        # Ternary quantization reproduces binary weights exactly too; zeros alone tell the kinds apart.
        w = LowBitWeight.quantize(value.float(), "ternary", GROUP_SIZE)
        if not torch.equal(w.dequantize(value.dtype), value):
            raise ValueError(f"{file}: {key} is not exactly s * {{-1, 0, +1}} per group of {GROUP_SIZE}; bonsai "
                             "packs the unpacked release losslessly and will not round it")
        tensors[key], has_zero = w, has_zero or bool((w.codes == 0).any())
    kind = stated or ("ternary" if has_zero else "binary")
    if kind == "binary":
        if has_zero:
            raise ValueError(f"{path.parent}/manifest.json says binary, but {file} has zero codes")
        tensors = {k: LowBitWeight.from_codes(v.codes, v.scales, "binary", GROUP_SIZE) if isinstance(v, LowBitWeight)
                   else v for k, v in tensors.items()}
    return kind, tensors, {"bits": BITS[kind], "group_size": GROUP_SIZE}


def _manifest_kind(path: Path) -> str | None:
    """'ternary' / 'binary' from manifest.json's model_version (e.g. "ternary g128 (bf16 master)"), if stated."""
    manifest = path.parent / "manifest.json"
    version = str(read_json(manifest).get("model_version", "")) if manifest.is_file() else ""
    stated = [k for k in BITS if k in version]
    return stated[0] if len(stated) == 1 else None


# --- text encoder, VAE, tokenizer -------------------------------------------------------------------------------


def find_text_encoder(folder: str | Path) -> tuple[str, Path]:
    folder = Path(folder)
    for fmt, sub in TEXT_ENCODER_DIRS.items():
        if (folder / sub / "config.json").is_file():
            return fmt, folder / sub
    raise FileNotFoundError(f"{folder} holds no text encoder (expected one of "
                            f"{', '.join(d + '/config.json' for d in TEXT_ENCODER_DIRS.values())})")


def read_text_encoder(folder: str | Path, layers: int | None = None, dtype: torch.dtype = torch.float32,
                      packed: bool = False, device=None):
    """-> (transformers Qwen3Config, dense Qwen3ForCausalLM state dict) from any released text-encoder folder.

    layers: keep only decoder layers [0, layers) (the features need 27 of 36); the config says so too.
    packed: the HQQ pack's linears stay `Int4Weight` (the other formats are always dense), on `device`.
    """
    fmt, path = find_text_encoder(folder)
    cfg = read_json(path / "config.json")
    quant = cfg.pop("quantization", None) or cfg.pop("quantization_config", None)
    cfg.pop("architectures", None)
    n_total = int(cfg.get("num_hidden_layers", 0))
    n = n_total if layers is None else int(layers)
    if not 0 < n <= n_total:
        raise ValueError(f"{path}/config.json has {n_total} layers, cannot keep {n}")
    keep = lambda key: not key.startswith("model.layers.") or int(key.split(".")[2]) < n  # noqa: E731
    if fmt == "hqq":
        state = hqq_to_dense(load_torch_file(path / "qmodel.pt"), dtype, keep, packed=packed,
                             device=device if packed else None)
    elif fmt == "mlx":
        if not quant or quant.get("bits") != 4:
            raise ValueError(f"{path}/config.json: expected \"quantization\": {{\"bits\": 4, ...}}, got {quant}")
        raw = _read_safetensors(path / "model.safetensors")
        state = {}
        for key, value in raw.items():
            prefix, _, leaf = key.rpartition(".")
            if not keep(key) or leaf in ("scales", "biases"):
                continue
            if f"{prefix}.scales" in raw:
                state[key] = mlx4_to_dense(value, raw[f"{prefix}.scales"], raw.get(f"{prefix}.biases"),
                                           int(quant["group_size"]), f"{path}: {prefix}", dtype=dtype)
            else:
                state[key] = value.to(dtype)
    else:
        state = {k: v.to(dtype) for k, v in _read_safetensors(path / "model.safetensors").items() if keep(k)}
    state.pop("lm_head.weight", None)
    for key in ("model.embed_tokens.weight", "model.norm.weight", f"model.layers.{n - 1}.input_layernorm.weight"):
        if key not in state:
            raise ValueError(f"{path}: text encoder misses {key}")
    return qwen3_config(cfg, n), state


def text_encoder_config(folder: str | Path) -> TextEncoderConfig:
    """The feature layers and prompt length of a repo's text encoder (see TextEncoderConfig)."""
    _, path = find_text_encoder(folder)
    cfg = read_json(path / "config.json")
    return TextEncoderConfig.from_dict({"num_hidden_layers": cfg.get("num_hidden_layers"),
                                        **{k: cfg[k] for k in ("feature_layers", "max_length") if k in cfg}},
                                       str(path / "config.json"))


def qwen3_config(cfg: dict, layers: int):
    """A transformers Qwen3Config of the first `layers` decoder layers."""
    import transformers

    cfg = {**{k: v for k, v in cfg.items() if k not in ("feature_layers", "max_length")}, "num_hidden_layers": layers}
    if cfg.get("layer_types"):
        cfg["layer_types"] = cfg["layer_types"][:layers]
    return transformers.Qwen3Config(**cfg)


def read_vae(folder: str | Path) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    path = Path(folder) / "vae"
    config = VAEConfig.from_json(path / "config.json")
    return config, _read_safetensors(path / "diffusion_pytorch_model.safetensors")


def tokenizer_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    for sub in ("tokenizer", "text_encoder-hqq-4bit/tokenizer", "text_encoder-mlx-4bit"):
        if (folder / sub / "tokenizer_config.json").is_file():
            return folder / sub
    raise FileNotFoundError(f"{folder} holds no tokenizer (expected tokenizer/tokenizer_config.json)")


# --- describe ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoInfo:
    folder: Path
    kind: str
    layout: str
    text_encoder: str
    transformer_bytes: int
    config: TransformerConfig

    def as_dict(self) -> dict:
        return {"folder": str(self.folder), "variant": f"{self.kind}-{self.layout}", "kind": self.kind,
                "layout": self.layout, "text_encoder": self.text_encoder, "transformer_bytes": self.transformer_bytes,
                "transformer": {"num_layers": self.config.num_layers,
                                "num_single_layers": self.config.num_single_layers,
                                "inner_dim": self.config.inner_dim}}


def describe(folder: str | Path) -> RepoInfo:
    """What a folder holds, read from its config files (the weights are not loaded)."""
    layout, path = find_transformer(folder)
    config = TransformerConfig.from_json(path / "config.json")
    if layout in ("gemlite", "mlx"):
        kind = _kind(read_quant_config(path)["bits"])
    elif layout == "compact":
        kind = read_json(path / "quantization_config.json").get("kind", "unknown")
    else:
        kind = _unpacked_kind(path, config)
    fmt = find_text_encoder(folder)[0] if any((Path(folder) / d).is_dir() for d in TEXT_ENCODER_DIRS.values()) else None
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return RepoInfo(Path(folder), kind, layout, fmt or "missing", size, config)


def _unpacked_kind(path: Path, config: TransformerConfig) -> str:
    """Kind of a dense release: the manifest's, else judged from its first quantized linear."""
    from safetensors import safe_open

    if stated := _manifest_kind(path):
        return stated
    key = f"{next(iter(lowbit_linears(config)))}.weight"
    file = path / WEIGHT_FILES["unpacked"]
    index = file.with_name(file.name + ".index.json")
    if not file.is_file() and index.is_file():
        file = path / read_json(index)["weight_map"][key]
    with safe_open(file, "pt") as f:
        w = f.get_tensor(key)
    q = LowBitWeight.quantize(w.float(), "ternary", GROUP_SIZE)
    if not torch.equal(q.dequantize(w.dtype), w):
        return "dense"
    return "ternary" if bool((q.codes == 0).any()) else "binary"
