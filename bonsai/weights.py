"""Readers of whole released Bonsai Image 4B folders: the transformer (through `bonsai.layouts`), the text
encoder, the VAE and the tokenizer.

Every transformer reader returns diffusers `Flux2Transformer2DModel` keys. The 100 big linears come back as
`LowBitWeight`, every other tensor dense. Assumptions the spec marks unverified are checked and fail with a
ValueError that names the file and key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import layouts
from .config import (Qwen3Fields, TextEncoderConfig, TransformerConfig, VAEConfig, mlx_quantization,
                     read_text_encoder_json)
from .errors import BonsaiFileNotFoundError, BonsaiValueError
from .files import load_torch_file
from .files import read_safetensors as _read_safetensors
from .layouts import GROUP_SIZE, Kind, dense_tensors, lowbit_linears, pack_sizes  # noqa: F401 (re-exported)
from .quant.qwen4bit import hqq_to_dense, mlx4_to_dense
from .state import check_finite

# --- transformer ------------------------------------------------------------------------------------------------


@dataclass
class TransformerWeights:
    config: TransformerConfig
    kind: Kind
    layout: str  # a `bonsai.layouts.LAYOUTS` name: "gemlite" | "mlx" | "compact" | "unpacked"
    tensors: dict  # diffusers key -> LowBitWeight | torch.Tensor
    path: Path  # the transformer folder
    quant_config: dict = field(default_factory=dict)
    autotune_file: Path | None = None


def find_transformer(folder: str | Path, layout: str | None = None) -> tuple[str, Path]:
    """-> (layout name, transformer folder); `bonsai.layouts.find_transformer` gives the layout record."""
    found, path = layouts.find_transformer(folder, layout)
    return found.name, path


def read_transformer(folder: str | Path, layout: str | None = None, device=None) -> TransformerWeights:
    """Read the transformer of a released (or compact) repo folder; see `bonsai.layouts.LAYOUTS`.

    device: where the stored tensors are converted (a GPU unpacks and checks 4B codes in a fraction of the CPU's
    time); the result lives there.
    """
    found, path = layouts.find_transformer(folder, layout)
    config = TransformerConfig.from_json(path / "config.json")
    kind, tensors, quant_config = found.read(path, config, device)
    autotune = path / layouts.GEMLITE_AUTOTUNE_FILE
    return TransformerWeights(config, kind, found.name, tensors, path, quant_config,
                              autotune if autotune.is_file() else None)


def read_gemlite_state(folder: str | Path) -> tuple[TransformerConfig, dict, dict]:
    """The released gemlite transformer as stored: (config, quantization_config, raw state dict)."""
    found, path = layouts.find_transformer(folder, layouts.GEMLITE.name)
    file = path / found.weight_file
    state = load_torch_file(file)
    check_finite(file, state)
    return TransformerConfig.from_json(path / "config.json"), found.read_quant(path)[1], state


# --- text encoder, VAE, tokenizer -------------------------------------------------------------------------------


def find_text_encoder(folder: str | Path) -> tuple[str, Path]:
    """-> (format name, text-encoder folder); `bonsai.layouts.find_text_encoder` gives the format record."""
    fmt, path = layouts.find_text_encoder(folder)
    return fmt.name, path


def read_text_encoder(folder: str | Path, layers: int | None = None, dtype: torch.dtype = torch.float32,
                      packed: bool = False, device=None):
    """-> (Qwen3Fields, dense Qwen3ForCausalLM state dict) from any released text-encoder folder.

    layers: keep only decoder layers [0, layers) (the features need 27 of 36); the config says so too.
    packed: the HQQ pack's linears stay `Int4Weight` (the other formats are always dense), on `device`.
    """
    fmt, path = layouts.find_text_encoder(folder)
    cfg, quant = read_text_encoder_json(path / "config.json")
    n_total = cfg["num_hidden_layers"]
    n = n_total if layers is None else int(layers)
    if not 0 < n <= n_total:
        raise BonsaiValueError(f"{path}/config.json: num_hidden_layers={n_total}, cannot keep {n} layers")
    keep = lambda key: _layer_index(key) < n  # noqa: E731
    file = path / fmt.weight_file
    if fmt is layouts.TE_HQQ:
        state = hqq_to_dense(with_model_prefix(load_torch_file(file)), dtype, keep, packed=packed,
                             device=device if packed else None, source=file)
    elif fmt is layouts.TE_MLX:
        bits, group = mlx_quantization(quant, path / "config.json")
        if bits != 4:
            raise BonsaiValueError(f"{path}/config.json: expected \"quantization\": {{\"bits\": 4, ...}}, got {quant}")
        raw = {k: v for k, v in with_model_prefix(_read_safetensors(file)).items() if keep(k)}
        check_finite(file, raw)
        state = {}
        for key, value in raw.items():
            prefix, _, leaf = key.rpartition(".")
            if leaf in ("scales", "biases"):
                continue
            if f"{prefix}.scales" in raw:
                if f"{prefix}.biases" not in raw:
                    raise BonsaiValueError(f"{file}: {prefix} has scales but no biases")
                state[key] = mlx4_to_dense(value, raw[f"{prefix}.scales"], raw[f"{prefix}.biases"], group,
                                           f"{file}: {prefix}", dtype=dtype)
            else:
                state[key] = value.to(dtype)
    else:
        raw = {k: v for k, v in with_model_prefix(_read_safetensors(file)).items() if keep(k)}
        check_finite(file, raw)
        state = {k: v.to(dtype) for k, v in raw.items()}
    state.pop("lm_head.weight", None)
    for key in ("model.embed_tokens.weight", "model.norm.weight", f"model.layers.{n - 1}.input_layernorm.weight"):
        if key not in state:
            raise BonsaiValueError(f"{file}: text encoder misses {key}")
    return Qwen3Fields.from_dict(cfg, str(path / "config.json")).first_layers(n), state


def _layer_index(key: str) -> int:
    """N of `model.layers.N.*`; -1 for any other key (kept, so that the strict check names a malformed one)."""
    parts = key.split(".")
    return int(parts[2]) if key.startswith("model.layers.") and len(parts) > 2 and parts[2].isdigit() else -1


def with_model_prefix(state: dict) -> dict:
    """Qwen3ForCausalLM keys (`model.layers.0...`, `lm_head`): a file saved from the bare Qwen3Model (hqq saves
    `AutoModel` leaves when the architecture is not `*CausalLM`) lacks the `model.` prefix; add it."""
    if any(k.startswith("model.") for k in state):
        return state
    return {k if k.startswith("lm_head") else f"model.{k}": v for k, v in state.items()}


def text_encoder_config(folder: str | Path) -> TextEncoderConfig:
    """The feature layers and prompt length of a repo's text encoder (see TextEncoderConfig)."""
    _, path = find_text_encoder(folder)
    cfg, _ = read_text_encoder_json(path / "config.json")
    return TextEncoderConfig.from_dict({"num_hidden_layers": cfg.get("num_hidden_layers"),
                                        **{k: cfg[k] for k in ("feature_layers", "max_length") if k in cfg}},
                                       str(path / "config.json"))


VAE_FILE = "vae/diffusion_pytorch_model.safetensors"


def read_vae(folder: str | Path) -> tuple[VAEConfig, dict[str, torch.Tensor]]:
    """-> (config, full AutoencoderKLFlux2 state dict, encoder included) of the repo's vae/ folder."""
    config = VAEConfig.from_json(Path(folder) / "vae" / "config.json")
    state = _read_safetensors(Path(folder) / VAE_FILE)
    check_vae_tensors(state, Path(folder) / VAE_FILE)
    return config, state


VAE_COUNTERS = ("bn.num_batches_tracked",)  # the only integer tensor of a diffusers VAE (never read)


def check_vae_tensors(state: dict, source) -> None:
    """Every VAE tensor (torch or mx) a finite float one, but the BatchNorm counter: no silent cast of int8."""
    check_finite(source, state, require_float=True, exempt=VAE_COUNTERS)


def tokenizer_dir(folder: str | Path) -> Path:
    folder = Path(folder)
    shipped = [folder / fmt.folder / fmt.tokenizer for fmt in layouts.TEXT_ENCODERS if fmt.tokenizer is not None]
    for path in (folder / "tokenizer", *shipped):
        if (path / "tokenizer_config.json").is_file():
            return path
    raise BonsaiFileNotFoundError(f"{folder} holds no tokenizer (expected tokenizer/tokenizer_config.json)")


# --- describe ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoInfo:
    folder: Path
    kind: str  # a Kind, or "dense" for an unpacked folder that is not low-bit
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
    found, path = layouts.find_transformer(folder)
    config = TransformerConfig.from_json(path / "config.json")
    kind = found.peek_kind(path, config)
    has_te = any((Path(folder) / fmt.folder).is_dir() for fmt in layouts.TEXT_ENCODERS)
    te = layouts.find_text_encoder(folder)[0].name if has_te else "missing"
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return RepoInfo(Path(folder), kind, found.name, te, size, config)
