"""Frozen configs read from the released `config.json` files. Field names are the diffusers keys.

Every value read from a file is checked against its field's annotation (`check_value`) and every config against
its invariants (`__post_init__`), so a bad file gives one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Union

from .errors import BonsaiValueError
from .files import read_json  # noqa: F401 (re-exported: bonsai.config.read_json is the JSON reader)

MAX_BLOCKS = 128  # transformer or text-encoder layers: klein 4B has 5 + 20 and 36; a larger count is a bad file
MAX_LENGTH = 512  # prompt tokens: klein's text encoder was trained on 512


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return " or ".join([_describe(a) for a in args if a is not type(None)] + ["null"] * (type(None) in args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            dict: "an object"}.get(hint, str(hint))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def check_value(value, hint, where: str):
    """`value`, as read from JSON, of the type `hint` names: int (not bool), float (an int is accepted; NaN and
    inf are not), bool, str, dict, tuple[X, ...] or tuple[X, Y] (from a JSON list; returned as a tuple), and
    `X | None`. Raises BonsaiValueError "<where> must be <type>, got <value>"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_value(value, arg, where)
            except BonsaiValueError:
                continue
    elif origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis and isinstance(value, list) else args
        if isinstance(value, list) and len(value) == len(items):
            try:
                return tuple(check_value(v, h, where) for v, h in zip(value, items))
            except BonsaiValueError:
                pass
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if abs(value) < 1e308:  # NaN, inf and ints beyond float range fail (NaN compares false)
                return value
            raise BonsaiValueError(f"{where} must be a finite number, got {_short(value)}")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, hint):
        return value
    raise BonsaiValueError(f"{where} must be {_describe(hint)}, got {_short(value)}")


def field_value(d: dict, keys: str | tuple[str, ...], hint, source, default=None):
    """The first of `keys` present in `d`, checked by `check_value` ("<source>: <key> must be ..."); `default`
    when none is present."""
    for key in (keys,) if isinstance(keys, str) else keys:
        if key in d:
            return check_value(d[key], hint, f"{source}: {key}")
    return default


def _from_dict(cls, d: dict[str, Any], source: str):
    """Build `cls` from the keys of `d` that are its fields (others are ignored), each checked against its
    annotation; the config's own invariants follow. Errors name `source` and the field."""
    if not isinstance(d, dict):
        raise BonsaiValueError(f"{source} must be a JSON object, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in d:
            kwargs[f.name] = check_value(d[f.name], hints[f.name], f"{source}: {f.name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise BonsaiValueError(f"{source}: missing field {f.name}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:
        raise BonsaiValueError(f"{source}: {e}") from None


def _in_range(config, names: str, lo, hi=None) -> None:
    """Each of the space-separated fields (an int, a float or a tuple of them; None skips it) lies in [lo, hi]."""
    for name in names.split():
        value = getattr(config, name)
        values = value if isinstance(value, tuple) else () if value is None else (value,)
        if any(v < lo or (hi is not None and v > hi) for v in values):
            bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
            raise BonsaiValueError(f"{name} must be in {bounds}, got {value}")


def _positive(config, names: str) -> None:
    for name in names.split():
        value = getattr(config, name)
        if value is not None and not value > 0:
            raise BonsaiValueError(f"{name} must be > 0, got {value}")


class FileConfig:
    """`from_dict` / `from_json` of the frozen configs: the dataclass's fields read from a config.json (other keys
    ignored), each value type-checked, errors naming the file (or `source`) and the field."""

    SOURCE: ClassVar[str] = "config"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None):
        return _from_dict(cls, d, source or cls.SOURCE)

    @classmethod
    def from_json(cls, path: str | Path):
        return cls.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class TransformerConfig(FileConfig):
    """`Flux2Transformer2DModel` config. Defaults are FLUX.2 [klein] 4B."""

    SOURCE: ClassVar[str] = "transformer config"

    patch_size: int = 1
    in_channels: int = 128
    out_channels: int | None = None
    num_layers: int = 5
    num_single_layers: int = 20
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 7680
    timestep_guidance_channels: int = 256
    mlp_ratio: float = 3.0
    axes_dims_rope: tuple[int, ...] = (32, 32, 32, 32)
    rope_theta: float = 2000
    eps: float = 1e-6
    guidance_embeds: bool = False

    def __post_init__(self):
        if self.patch_size != 1:
            raise BonsaiValueError(f"patch_size must be 1 (the 2x2 patchify happens outside the model), got "
                                   f"{self.patch_size}")
        _in_range(self, "in_channels out_channels attention_head_dim num_attention_heads joint_attention_dim", 1,
                  1 << 16)
        _in_range(self, "timestep_guidance_channels", 2, 1 << 16)
        _in_range(self, "num_layers num_single_layers", 0, MAX_BLOCKS)
        _in_range(self, "mlp_ratio", 0, 16)
        _positive(self, "mlp_ratio rope_theta eps")
        if self.timestep_guidance_channels % 2:
            raise BonsaiValueError(f"timestep_guidance_channels must be even (cos | sin halves), got "
                                   f"{self.timestep_guidance_channels}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise BonsaiValueError(f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim="
                                   f"{self.attention_head_dim}")
        if any(d < 0 or d % 2 for d in self.axes_dims_rope):
            raise BonsaiValueError(f"axes_dims_rope must be even and >= 0, got {self.axes_dims_rope}")
        if self.mlp_hidden_dim < 1:
            raise BonsaiValueError(f"mlp_ratio={self.mlp_ratio} leaves no MLP ({self.inner_dim} * ratio < 1)")
        if self.guidance_embeds:
            raise BonsaiValueError("guidance_embeds=True is FLUX.2 [dev]; Bonsai/klein checkpoints have no guidance "
                                   "embedder")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels



@dataclass(frozen=True)
class VAEConfig(FileConfig):
    """`AutoencoderKLFlux2` config. Defaults are the FLUX.2 VAE."""

    SOURCE: ClassVar[str] = "vae config"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 32
    norm_num_groups: int = 32
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    patch_size: tuple[int, int] = (2, 2)

    def __post_init__(self):
        if self.act_fn != "silu":
            raise BonsaiValueError(f"act_fn must be 'silu', got {self.act_fn!r}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise BonsaiValueError(f"up_block_types must all be UpDecoderBlock2D, got {self.up_block_types}")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise BonsaiValueError(f"down_block_types must all be DownEncoderBlock2D, got {self.down_block_types}")
        if tuple(self.patch_size) != (2, 2):
            raise BonsaiValueError(f"patch_size must be (2, 2), got {self.patch_size}")
        _in_range(self, "in_channels out_channels latent_channels norm_num_groups", 1, 1 << 16)
        _in_range(self, "block_out_channels decoder_block_out_channels", 1, 1 << 16)
        _in_range(self, "layers_per_block", 1, 16)
        _in_range(self, "batch_norm_eps", 0)
        if not 1 <= len(self.block_out_channels) <= 8:
            raise BonsaiValueError(f"block_out_channels must list 1 to 8 channel counts, got {self.block_out_channels}")
        if len(self.decoder_channels) != len(self.block_out_channels):
            raise BonsaiValueError(f"decoder_block_out_channels {self.decoder_block_out_channels} must have as many "
                                   f"entries as block_out_channels {self.block_out_channels}")
        # GroupNorm splits every block's channels into norm_num_groups groups
        if any(c % self.norm_num_groups for c in self.block_out_channels + self.decoder_channels):
            raise BonsaiValueError(f"norm_num_groups must divide every entry of block_out_channels "
                                   f"{self.block_out_channels} and of the decoder's {self.decoder_channels}, got "
                                   f"{self.norm_num_groups}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(self.decoder_block_out_channels or self.block_out_channels)

    @property
    def scale_factor(self) -> int:
        """Pixels per VAE latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)



@dataclass(frozen=True)
class SchedulerConfig(FileConfig):
    """`FlowMatchEulerDiscreteScheduler` config as used by klein (dynamic exponential shift)."""

    SOURCE: ClassVar[str] = "scheduler config"

    num_train_timesteps: int = 1000
    shift: float = 3.0
    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    def __post_init__(self):
        if self.time_shift_type != "exponential":
            raise BonsaiValueError(f"time_shift_type must be 'exponential', got {self.time_shift_type!r}")
        _in_range(self, "num_train_timesteps base_image_seq_len max_image_seq_len", 1)
        _positive(self, "shift")



@dataclass(frozen=True)
class TextEncoderConfig(FileConfig):
    """How prompts become features: the Qwen3 hidden states after decoder layers `feature_layers` (1-based; index 0
    would be the embeddings), concatenated per token, prompts padded to `max_length` tokens.

    Read from the text encoder's config.json: `feature_layers` is our key (the tiny test repos write it); released
    configs lack it and get klein's (9, 18, 27).
    """

    SOURCE: ClassVar[str] = "text encoder config"

    feature_layers: tuple[int, ...] = (9, 18, 27)
    max_length: int = 512
    num_hidden_layers: int = 36

    def __post_init__(self):
        _in_range(self, "num_hidden_layers", 1, MAX_BLOCKS)
        _in_range(self, "max_length", 1, MAX_LENGTH)
        if not self.feature_layers or list(self.feature_layers) != sorted(set(self.feature_layers)):
            raise BonsaiValueError(f"feature_layers must be increasing layer numbers, got {self.feature_layers}")
        if self.feature_layers[0] < 1 or self.feature_layers[-1] > self.num_hidden_layers:
            raise BonsaiValueError(f"feature_layers {self.feature_layers} must lie in [1, num_hidden_layers="
                                   f"{self.num_hidden_layers}]")

    @property
    def layers_needed(self) -> int:
        """Decoder layers to load: the features never read past the last feature layer."""
        return self.feature_layers[-1]



@dataclass(frozen=True)
class Qwen3Fields(FileConfig):
    """The values of a Qwen3 text encoder's config.json that bonsai's torch and MLX encoders read, checked. A
    default of None stands for an absent key (the default applies); only the `| None` fields may be null in the
    file."""

    SOURCE: ClassVar[str] = "text encoder config"

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # these three have different defaults in transformers and mlx-lm: the file says
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int = None
    rope_theta: float = None  # or in rope_parameters (transformers >= 5); one of them is required
    tie_word_embeddings: bool = None
    attention_bias: bool = None
    use_sliding_window: bool = None
    hidden_act: str = None
    layer_types: tuple[str, ...] | None = None
    rope_parameters: dict | None = None
    rope_scaling: dict | None = None

    def __post_init__(self):
        _in_range(self, "vocab_size hidden_size intermediate_size num_attention_heads num_key_value_heads head_dim "
                  "max_position_embeddings", 1, 1 << 20)
        _in_range(self, "num_hidden_layers", 1, MAX_BLOCKS)
        _positive(self, "rms_norm_eps rope_theta")
        if self.num_attention_heads % self.num_key_value_heads:
            raise BonsaiValueError(f"num_key_value_heads must divide num_attention_heads={self.num_attention_heads}, "
                                   f"got {self.num_key_value_heads}")
        if self.hidden_act not in (None, "silu"):
            raise BonsaiValueError(f"hidden_act must be 'silu' (Qwen3), got {self.hidden_act!r}")
        if self.use_sliding_window:
            raise BonsaiValueError("use_sliding_window must be false: the klein text encoder attends to all tokens")
        if self.layer_types is not None and (len(self.layer_types) != self.num_hidden_layers or
                                             set(self.layer_types) != {"full_attention"}):
            raise BonsaiValueError(f"layer_types must be 'full_attention' for each of the num_hidden_layers="
                                   f"{self.num_hidden_layers} layers, got {_short(list(self.layer_types))}")
        for name in ("rope_parameters", "rope_scaling"):
            rope = getattr(self, name) or {}
            if rope.get("rope_type", rope.get("type", "default")) != "default":
                raise BonsaiValueError(f"{name} must use the default RoPE (rope_type 'default'), got {_short(rope)}")
            if "rope_theta" in rope:
                theta = check_value(rope["rope_theta"], float, f"{name}.rope_theta")
                if not theta > 0:
                    raise BonsaiValueError(f"{name}.rope_theta must be > 0, got {theta}")
        nested = (self.rope_parameters or {}).get("rope_theta")
        if self.rope_theta is None and nested is None:
            raise BonsaiValueError("missing field rope_theta (or rope_parameters.rope_theta)")
        if None not in (self.rope_theta, nested) and self.rope_theta != nested:  # the libraries read one each
            raise BonsaiValueError(f"rope_theta={self.rope_theta} disagrees with rope_parameters.rope_theta={nested}")

    @property
    def theta(self) -> float:
        """The RoPE base: rope_theta, else rope_parameters.rope_theta (transformers >= 5 writes it there)."""
        return self.rope_theta if self.rope_theta is not None else self.rope_parameters["rope_theta"]

    def first_layers(self, n: int) -> "Qwen3Fields":
        """The config of decoder layers [0, n)."""
        types = None if self.layer_types is None else self.layer_types[:n]
        return dataclasses.replace(self, num_hidden_layers=n, layer_types=types)

    def to_dict(self) -> dict:
        """The fields the file set, rope_theta resolved: a config dict (for transformers, in tests)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}
        return {**d, **({"layer_types": list(self.layer_types)} if self.layer_types else {}), "rope_theta": self.theta}



QUANTIZATION_KEYS = ("quantization", "quantization_config")  # mlx-lm writes the same entry under both
MLX_BITS, MLX_GROUP_SIZES = (2, 3, 4, 5, 6, 8), (32, 64, 128)


def read_text_encoder_json(path: str | Path) -> tuple[dict, dict | None]:
    """A text encoder's config.json -> (the config without its quantization entries, the quantization entry or
    None), the Qwen3 values checked (`Qwen3Fields`).

    The entry may come as `quantization`, `quantization_config` or both (mlx-lm writes both); both must then agree
    on every key they share.
    """
    cfg = read_json(path)
    entries = {k: cfg.pop(k) for k in QUANTIZATION_KEYS if k in cfg}
    entries = {k: v for k, v in entries.items() if v is not None}
    for key, entry in entries.items():
        if not isinstance(entry, dict):
            raise BonsaiValueError(f"{path}: {key} must be an object, got {_short(entry)}")
    if len(entries) == 2:
        first, second = entries.values()
        for key in sorted(set(first) & set(second)):
            if first[key] != second[key]:
                raise BonsaiValueError(f"{path}: quantization and quantization_config disagree on {key!r}: "
                                       f"{_short(first[key])} vs {_short(second[key])}")
    quant = {k: v for entry in reversed(entries.values()) for k, v in entry.items()} or None
    Qwen3Fields.from_dict(cfg, str(path))
    return cfg, quant


def mlx_quantization(quant: dict | None, source) -> tuple[int, int]:
    """(bits, group_size) of an MLX-quantized text encoder's quantization entry, checked."""
    if quant is None:
        raise BonsaiValueError(f"{source}: quantized tensors need a \"quantization\": {{\"bits\", \"group_size\"}} "
                               "entry")
    bits = field_value(quant, "bits", int, f"{source}: quantization")
    group = field_value(quant, "group_size", int, f"{source}: quantization")
    if bits not in MLX_BITS or group not in MLX_GROUP_SIZES:
        raise BonsaiValueError(f"{source}: quantization bits must be one of {MLX_BITS} and group_size one of "
                               f"{MLX_GROUP_SIZES}, got bits={bits!r} group_size={group!r}")
    return bits, group


KLEIN_4B = TransformerConfig()
FLUX2_VAE = VAEConfig()
