"""Frozen configs read from the released `config.json` files. Field names are the diffusers keys."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _from_dict(cls, d: dict[str, Any], source: str):
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k in names:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


def read_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing config file {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


@dataclass(frozen=True)
class TransformerConfig:
    """`Flux2Transformer2DModel` config. Defaults are FLUX.2 [klein] 4B."""

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
            raise ValueError(f"patch_size must be 1 (the 2x2 patchify happens outside the model), got {self.patch_size}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"sum(axes_dims_rope)={sum(self.axes_dims_rope)} must equal attention_head_dim={self.attention_head_dim}"
            )
        if any(d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope must be even, got {self.axes_dims_rope}")
        if self.guidance_embeds:
            raise ValueError("guidance_embeds=True is FLUX.2 [dev]; Bonsai/klein checkpoints have no guidance embedder")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.inner_dim * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "transformer config") -> "TransformerConfig":
        return _from_dict(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "TransformerConfig":
        return cls.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class VAEConfig:
    """`AutoencoderKLFlux2` config. Defaults are the FLUX.2 VAE."""

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
            raise ValueError(f"act_fn must be 'silu', got {self.act_fn!r}")
        if any(t != "UpDecoderBlock2D" for t in self.up_block_types):
            raise ValueError(f"up_block_types must all be UpDecoderBlock2D, got {self.up_block_types}")
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ValueError(f"down_block_types must all be DownEncoderBlock2D, got {self.down_block_types}")
        if tuple(self.patch_size) != (2, 2):
            raise ValueError(f"patch_size must be (2, 2), got {self.patch_size}")

    @property
    def decoder_channels(self) -> tuple[int, ...]:
        return tuple(self.decoder_block_out_channels or self.block_out_channels)

    @property
    def scale_factor(self) -> int:
        """Pixels per VAE latent along each side."""
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "vae config") -> "VAEConfig":
        return _from_dict(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "VAEConfig":
        return cls.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class SchedulerConfig:
    """`FlowMatchEulerDiscreteScheduler` config as used by klein (dynamic exponential shift)."""

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
            raise ValueError(f"time_shift_type must be 'exponential', got {self.time_shift_type!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "scheduler config") -> "SchedulerConfig":
        return _from_dict(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        return cls.from_dict(read_json(path), str(path))


@dataclass(frozen=True)
class TextEncoderConfig:
    """How prompts become features: the Qwen3 hidden states after decoder layers `feature_layers` (1-based; index 0
    would be the embeddings), concatenated per token, prompts padded to `max_length` tokens.

    Read from the text encoder's config.json: `feature_layers` is our key (the tiny test repos write it); released
    configs lack it and get klein's (9, 18, 27).
    """

    feature_layers: tuple[int, ...] = (9, 18, 27)
    max_length: int = 512
    num_hidden_layers: int = 36

    def __post_init__(self):
        if not self.feature_layers or list(self.feature_layers) != sorted(set(self.feature_layers)):
            raise ValueError(f"feature_layers must be increasing layer numbers, got {self.feature_layers}")
        if self.feature_layers[0] < 1 or self.feature_layers[-1] > self.num_hidden_layers:
            raise ValueError(f"feature_layers {self.feature_layers} must lie in [1, num_hidden_layers="
                             f"{self.num_hidden_layers}]")

    @property
    def layers_needed(self) -> int:
        """Decoder layers to load: the features never read past the last feature layer."""
        return self.feature_layers[-1]

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "text encoder config") -> "TextEncoderConfig":
        return _from_dict(cls, d, source)

    @classmethod
    def from_json(cls, path: str | Path) -> "TextEncoderConfig":
        return cls.from_dict(read_json(path), str(path))


KLEIN_4B = TransformerConfig()
FLUX2_VAE = VAEConfig()
