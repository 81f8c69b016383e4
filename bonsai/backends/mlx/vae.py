"""FLUX.2 VAE decoder and encoder in MLX, NHWC. Attribute names are the AutoencoderKLFlux2 keys.

The released `vae/` safetensors load after one rule: torch conv weights [O, I, kh, kw] -> MLX [O, kh, kw, I].
Large images decode in overlapping tiles whose size is chosen from a memory budget.
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ... import latents as L
from ...config import VAEConfig
from ...errors import BonsaiValueError
from ...tiling import tile_plan
from . import mx_dtype, to_mx
from .loading import load_strict

GN_EPS = 1e-6
IGNORED_PREFIXES = ("encoder.", "quant_conv.")  # the encode path, unused for text-to-image
TILE_CANDIDATES = (128, 96, 64, 48, 32, 24, 16, 8)  # VAE latent pixels per tile side, largest first


def _group_norm(groups: int, c: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, c, eps=GN_EPS, pytorch_compatible=True)


class ResnetBlock2D(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = _group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = _group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def __call__(self, x: mx.array) -> mx.array:
        h = self.conv1(nn.silu(self.norm1(x)))
        h = self.conv2(nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a GroupNorm in front and a residual."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = _group_norm(groups, c)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = [nn.Linear(c, c)]  # key "to_out.0"

    def __call__(self, x: mx.array) -> mx.array:
        b, h, w, c = x.shape
        t = self.group_norm(x).reshape(b, 1, h * w, c)  # [B, heads=1, HW, C]
        q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=c**-0.5)
        return x + self.to_out[0](out).reshape(b, h, w, c)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(c, c, groups), ResnetBlock2D(c, c, groups)]
        self.attentions = [Attention(c, groups)] if add_attention else None

    def __call__(self, x: mx.array) -> mx.array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.repeat(mx.repeat(x, 2, axis=1), 2, axis=2))  # nearest x2 in NHWC


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(n_resnets)]
        self.upsamplers = [Upsample(c_out)] if upsample else None

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.decoder_channels, cfg.norm_num_groups
        top = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        self.mid_block = MidBlock(top, groups, cfg.mid_block_add_attention)
        rev = list(reversed(chans))
        self.up_blocks = [UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups,
                                  upsample=i < len(rev) - 1) for i in range(len(rev))]
        self.conv_norm_out = _group_norm(groups, chans[0])
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def __call__(self, z: mx.array) -> mx.array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(x)))


class BatchStats(nn.Module):
    """The VAE's affine-free BatchNorm over patchified latents; only its running statistics are used.

    Kept in float32 whatever the decoder's dtype: the shared torch glue in bonsai.latents applies them.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.running_mean = mx.zeros((channels,), mx.float32)
        self.running_var = mx.ones((channels,), mx.float32)


# --- tiling -----------------------------------------------------------------------------------------------------


def blend_tiles(fn, z: mx.array, tile: int, overlap: int, scale: int, blend: str = "cosine") -> mx.array:
    """Apply `fn` (NHWC [B, h, w, C] -> [B, h*scale, w*scale, C']) on overlapping tiles of z and blend them.

    Tiles are placed and weighted by `bonsai.tiling.tile_plan` (linear or cosine cross-fades, normalised by the
    total weight), so a local `fn` is reproduced exactly. Each tile is evaluated before the next, bounding peak
    memory to one tile.
    """
    _, h, w, _ = z.shape
    plan = tile_plan(h, w, tile, overlap, scale, blend)
    out = None
    for t in plan.tiles:
        piece = fn(z[:, t.latent[0], t.latent[1]]).astype(mx.float32)
        if out is None:
            out = mx.zeros((piece.shape[0], h * scale, w * scale, piece.shape[3]), mx.float32)
        ys, xs = t.out
        out[:, ys, xs] = out[:, ys, xs] + piece * mx.array(t.weight)[None, :, :, None]
        mx.eval(out)
    return (out / mx.array(plan.total)[None, :, :, None]).astype(z.dtype)


def decode_memory_bytes(h: int, w: int, batch: int, dtype, cfg: VAEConfig | None = None) -> int:
    """Rough peak bytes of decoding [batch, h, w] VAE latents: a few full-resolution activations of the widest
    late block plus the mid-block attention scores (materialised by the CPU kernel)."""
    cfg = cfg or VAEConfig()
    chans, s = cfg.decoder_channels, cfg.scale_factor
    widest_full_res = chans[1] if len(chans) > 1 else chans[0]  # the last upsampler runs at this width
    return batch * mx_dtype(dtype).size * (4 * widest_full_res * (s * h) * (s * w) + (h * w) ** 2)


def memory_budget_gb() -> float:
    """A quarter of the recommended Metal working set, or of physical RAM on MLX-CPU."""
    if mx.metal.is_available():
        info = mx.device_info()
        size = info.get("max_recommended_working_set_size") or info.get("memory_size")
        if size:
            return size / 4 / 1e9
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 4 / 1e9


def choose_tile(h: int, w: int, batch: int, dtype, max_memory_gb: float | None = None,
                cfg: VAEConfig | None = None) -> int | None:
    """None when the whole [h, w] decode fits the budget, else the largest tile side (VAE latents) that does."""
    budget = (memory_budget_gb() if max_memory_gb is None else max_memory_gb) * 1e9
    if decode_memory_bytes(h, w, batch, dtype, cfg) <= budget:
        return None
    smaller = [t for t in TILE_CANDIDATES if t < max(h, w)] or [TILE_CANDIDATES[-1]]
    for t in smaller:
        if decode_memory_bytes(t, t, batch, dtype, cfg) <= budget:
            return t
    return smaller[-1]


# --- model ------------------------------------------------------------------------------------------------------


def to_uint8(image: mx.array) -> np.ndarray:
    """NHWC [B, H, W, 3] in about [-1, 1] -> uint8 [B, H, W, 3], with the arithmetic of diffusers' postprocess."""
    x = mx.clip(image.astype(mx.float32) / 2 + 0.5, 0, 1)
    return np.round(np.array(x) * 255).astype(np.uint8)


class VAEDecoder(nn.Module):
    """post_quant_conv + decoder + BN statistics of AutoencoderKLFlux2."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg)
        self.bn = BatchStats(4 * cfg.latent_channels)

    def __call__(self, z: mx.array) -> mx.array:
        """VAE latents NHWC [B, h, w, latent_channels] -> image NHWC [B, h*scale, w*scale, 3] in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: mx.array, tile: bool | None = None, tile_size: int | None = None,
               tile_overlap: int | None = None, blend: str = "cosine", max_memory_gb: float | None = None) -> mx.array:
        """Like __call__, optionally over overlapping tiles (sizes in VAE latent pixels).

        tile=None tiles when the whole decode would exceed `max_memory_gb` (default: a quarter of device memory);
        tile_size=None picks the largest tile that fits; the overlap defaults to a quarter of the tile.
        """
        b, h, w, _ = z.shape
        if tile is None or (tile and tile_size is None):
            chosen = choose_tile(h, w, b, z.dtype, max_memory_gb, self.config)
            tile = bool(tile) or chosen is not None
            tile_size = tile_size or chosen or max(h, w)
        if not tile:
            return self(z)
        overlap = tile_size // 4 if tile_overlap is None else tile_overlap
        return blend_tiles(self, z, tile_size, overlap, self.config.scale_factor, blend)

    def latents_to_vae(self, packed: mx.array, height: int, width: int) -> mx.array:
        """Packed transformer latents [B, h*w, 4*latent_channels] -> VAE latents NHWC [B, 2h, 2w, latent_channels].

        Unpack, BN de-normalisation and unpatchify are the shared torch glue (fp32; these tensors are small).
        """
        import torch

        h, w = L.latent_size(height, width)
        c = 4 * self.config.latent_channels
        if packed.ndim != 3 or tuple(packed.shape[1:]) != (h * w, c):
            raise ValueError(f"latents for {height}x{width} must be [B, {h * w}, {c}], got {tuple(packed.shape)}")
        x = torch.from_numpy(np.array(packed.astype(mx.float32)))
        mean, var = (torch.from_numpy(np.array(a)) for a in (self.bn.running_mean, self.bn.running_var))
        z = L.bn_denormalize(L.unpack(x, h, w), mean, var, self.config.batch_norm_eps)
        z = L.unpatchify(z)  # [B, C, 2h, 2w]
        return mx.array(z.permute(0, 2, 3, 1).contiguous().numpy())  # NHWC

    def decode_latents(self, packed: mx.array, height: int, width: int, tile: bool | None = None,
                       tile_size: int | None = None, tile_overlap: int | None = None, blend: str = "cosine",
                       max_memory_gb: float | None = None) -> np.ndarray:
        """Packed latents [B, N_img, 128] -> uint8 images [B, H, W, 3] (H, W floored to multiples of 16)."""
        z = self.latents_to_vae(packed, height, width).astype(self.decoder.conv_in.weight.dtype)
        return to_uint8(self.decode(z, tile, tile_size, tile_overlap, blend, max_memory_gb))


def decoder_state(state: dict) -> dict:
    """Keep the decode-path keys of a full AutoencoderKLFlux2 state dict; drop the encoder path."""
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES) and k != "bn.num_batches_tracked"}


def load_vae_decoder(state: dict, config: VAEConfig, dtype="float16", source: str = "vae") -> VAEDecoder:
    """Build the decoder from a full VAE state dict (torch, numpy or mx values); strict on decoder keys.

    source: the file named first in a mismatch error.
    """
    dtype = mx_dtype(dtype)
    model = VAEDecoder(config)
    given = {}
    for key, value in decoder_state(state).items():
        a = to_mx(value, mx.float32)
        a = a.transpose(0, 2, 3, 1) if a.ndim == 4 else a  # torch conv [O, I, kh, kw] -> [O, kh, kw, I]
        given[key] = a if key.startswith("bn.") else a.astype(dtype)
    return load_strict(model, given, source, "VAE decoder weights (conv shapes in MLX layout)")


# --- encoder ----------------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def __call__(self, x: mx.array) -> mx.array:
        return self.conv(mx.pad(x, [(0, 0), (0, 1), (0, 1), (0, 0)]))  # diffusers' Downsample2D: pad right/bottom


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(n_resnets)]
        self.downsamplers = [Downsample(c_out)] if downsample else None

    def __call__(self, x: mx.array) -> mx.array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = [DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups,
                                      downsample=i < len(chans) - 1) for i in range(len(chans))]
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = _group_norm(groups, chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def __call__(self, x: mx.array) -> mx.array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(nn.silu(self.conv_norm_out(self.mid_block(x))))


class VAEEncoder(nn.Module):
    """encoder + quant_conv + BN statistics of AutoencoderKLFlux2 (the encode path)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.bn = BatchStats(4 * cfg.latent_channels)

    def __call__(self, image: mx.array) -> mx.array:
        """Image NHWC [B, H, W, 3] in [-1, 1] -> posterior moments NHWC [B, H/scale, W/scale, 2*latent_channels]."""
        moments = self.encoder(image)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    def encode_tokens(self, image) -> mx.array:
        """Image [B, 3, H, W] in [-1, 1] (torch CPU or numpy, H, W multiples of 16) -> packed latents [B, N, 128] f32.

        The posterior mode, 2x2 patchify and BN normalisation are the shared torch glue (fp32; these tensors are small).
        """
        import torch

        multiple = self.config.scale_factor * L.PATCH
        shape = tuple(image.shape)
        if len(shape) != 4 or shape[1] != self.config.in_channels or shape[2] % multiple or shape[3] % multiple:
            raise BonsaiValueError(f"image must be [B, {self.config.in_channels}, H, W] with H, W multiples of "
                                   f"{multiple}, got {shape}")
        x = np.asarray(image.float().numpy() if isinstance(image, torch.Tensor) else image, np.float32)
        x = mx.array(x.transpose(0, 2, 3, 1)).astype(self.encoder.conv_in.weight.dtype)  # NHWC
        moments = torch.from_numpy(np.array(self(x).astype(mx.float32))).permute(0, 3, 1, 2)  # NCHW
        stats = (torch.from_numpy(np.array(t)) for t in (self.bn.running_mean, self.bn.running_var))
        tokens = L.image_tokens(moments, *stats, self.config.batch_norm_eps)
        return mx.array(tokens.contiguous().numpy())


BN_STATS = ("bn.running_mean", "bn.running_var")  # the encode path normalises with them too


def encoder_state(state: dict) -> dict:
    """Keep the encode-path keys (encoder.*, quant_conv.*, BN statistics) of a full AutoencoderKLFlux2 state dict."""
    return {k: v for k, v in state.items() if k.startswith(IGNORED_PREFIXES) or k in BN_STATS}


def load_vae_encoder(state: dict, config: VAEConfig, dtype="float32", source: str = "vae") -> VAEEncoder:
    """Build the encoder from a full VAE state dict (torch, numpy or mx values); strict on the encode-path keys."""
    dtype = mx_dtype(dtype)
    model = VAEEncoder(config)
    given = {}
    for key, value in encoder_state(state).items():
        a = to_mx(value, mx.float32)
        a = a.transpose(0, 2, 3, 1) if a.ndim == 4 else a  # torch conv [O, I, kh, kw] -> [O, kh, kw, I]
        given[key] = a if key.startswith("bn.") else a.astype(dtype)
    return load_strict(model, given, source, "VAE encoder weights (conv shapes in MLX layout)")
