"""FLUX.2 VAE decoder and encoder in plain torch. Attribute names are the AutoencoderKLFlux2 keys."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ... import latents as L
from ...config import VAEConfig
from ...errors import BonsaiValueError
from ...state import check_state
from ...tiling import tile_plan

GN_EPS = 1e-6
AUTO_TILE_ABOVE = 128  # VAE latent pixels (1024 image pixels) per side; larger images decode in tiles
IGNORED_PREFIXES = ("encoder.", "quant_conv.")  # the encode path, unused for text-to-image
IGNORED_KEYS = ("bn.num_batches_tracked",)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm whose 16-bit path computes the statistics and the affine in float32 with plain reductions:
    torch's bf16 GroupNorm kernel took 46 of the decoder's 85 ms at 1024x1024 on an H200; one rounding at the
    end, as that kernel. float32 inputs keep F.group_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        b, c = x.shape[:2]
        g = x.float().reshape(b, self.num_groups, -1)  # [B, G, C/G * H * W]
        var, mean = torch.var_mean(g, dim=-1, unbiased=False, keepdim=True)
        y = ((g - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        shape = (1, c) + (1,) * (x.ndim - 2)
        return torch.addcmul(self.bias.float().reshape(shape), y, self.weight.float().reshape(shape)).to(x.dtype)


def norm_act(norm: GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """`norm(x)`, then SiLU if `silu`."""
    y = norm(x)
    return F.silu(y) if silu else y


def conv(layer: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return layer(x)


def conv_norm_act(layer: nn.Conv2d, norm: GroupNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """`norm_act(norm, layer(x), silu)`: a resnet's first conv into its second norm."""
    return norm_act(norm, layer(x), silu)


def conv_add(layer: nn.Conv2d, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x + layer(h): a resnet's second conv and its residual."""
    return x + layer(h)


def upsample(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, scale_factor=2.0, mode="nearest")


@dataclass(frozen=True)
class VaeOps:
    """The decoder's steps a backend may replace, each with the arithmetic of the torch function here (CUDA:
    Triton kernels that fold a conv's bias into the pass after it, `bonsai.backends.cuda.elementwise`). Each field
    is one step on its own: `conv_norm_act` does not call `norm_act`."""

    norm_act: Callable = norm_act
    conv: Callable = conv
    conv_norm_act: Callable = conv_norm_act
    conv_add: Callable = conv_add
    upsample: Callable = upsample
    attention: Callable = F.scaled_dot_product_attention


TORCH_VAE_OPS = VaeOps()


class ResnetBlock2D(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.ops = ops
        self.norm1 = GroupNorm(groups, c_in, eps=GN_EPS)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = GroupNorm(groups, c_out, eps=GN_EPS)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ops = self.ops
        h = ops.conv_norm_act(self.conv1, self.norm2, ops.norm_act(self.norm1, x, True), True)
        return ops.conv_add(self.conv2, h, x if self.conv_shortcut is None else ops.conv(self.conv_shortcut, x))


class Attention(nn.Module):
    """Single-head self-attention over all positions, with a GroupNorm in front and a residual."""

    def __init__(self, c: int, groups: int, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.ops = ops
        self.group_norm = GroupNorm(groups, c, eps=GN_EPS)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])  # key "to_out.0"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        t = self.ops.norm_act(self.group_norm, x, False).reshape(b, c, h * w).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(t).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # [B, 1, HW, C]
        out = self.to_out[0](self.ops.attention(q, k, v).squeeze(1))
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, add_attention: bool, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(c, c, groups, ops), ResnetBlock2D(c, c, groups, ops)])
        self.attentions = nn.ModuleList([Attention(c, groups, ops)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Upsample(nn.Module):
    def __init__(self, c: int, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.ops = ops
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.conv(self.conv, self.ops.upsample(x))


class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, upsample: bool,
                 ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups, ops) for i in range(n_resnets)]
        )
        self.upsamplers = nn.ModuleList([Upsample(c_out, ops)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.ops = ops
        chans, groups = cfg.decoder_channels, cfg.norm_num_groups
        top = chans[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, top, 3, padding=1)
        self.mid_block = MidBlock(top, groups, cfg.mid_block_add_attention, ops)
        rev = list(reversed(chans))
        self.up_blocks = nn.ModuleList(
            UpBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, groups, i < len(rev) - 1, ops)
            for i in range(len(rev))
        )
        self.conv_norm_out = GroupNorm(groups, chans[0], eps=GN_EPS)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.ops.conv(self.conv_in, z))
        for block in self.up_blocks:
            x = block(x)
        return self.ops.conv(self.conv_out, self.ops.norm_act(self.conv_norm_out, x, True))


class BatchStats(nn.Module):
    """The VAE's affine-free BatchNorm over patchified latents; only its running statistics are used."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))


# --- tiling -----------------------------------------------------------------------------------------------------


def blend_tiles(fn, z: torch.Tensor, tile: int, overlap: int, scale: int, blend: str = "cosine") -> torch.Tensor:
    """Apply `fn` ([B, C, h, w] -> [B, C', h*scale, w*scale]) on overlapping tiles of z and blend the results.

    Tiles are `tile` latent pixels with `overlap` shared pixels, placed and weighted by `bonsai.tiling.tile_plan`
    (linear or cosine cross-fades, normalised by the total weight), so a local `fn` is reproduced exactly.
    """
    _, _, h, w = z.shape
    plan = tile_plan(h, w, tile, overlap, scale, blend)
    out = None
    for t in plan.tiles:
        piece = fn(z[(..., *t.latent)]).float()
        if out is None:
            out = piece.new_zeros(piece.shape[0], piece.shape[1], h * scale, w * scale)
        out[(..., *t.out)] += piece * torch.from_numpy(t.weight).to(piece.device)
    return (out / torch.from_numpy(plan.total).to(out.device)).to(z.dtype)


# --- model ------------------------------------------------------------------------------------------------------


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in about [-1, 1] -> uint8 [B, H, W, 3] on the image's device, with the arithmetic of diffusers'
    postprocess (float32, round half to even): only the uint8 pixels cross to the host."""
    x = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    # channels last on the device: a strided copy would leave the host a 2-3 ms transpose per 1024x1024 image
    return x.permute(0, 2, 3, 1).contiguous()


def tiles(side: int, tile: bool | None) -> bool:
    """Whether a decode of VAE latents `side` pixels on their longer side runs in tiles (tile=None: above
    AUTO_TILE_ABOVE)."""
    return side > AUTO_TILE_ABOVE if tile is None else bool(tile)


class VAEDecoder(nn.Module):
    """post_quant_conv + decoder + BN statistics of AutoencoderKLFlux2."""

    def __init__(self, cfg: VAEConfig, ops: VaeOps = TORCH_VAE_OPS):
        super().__init__()
        self.config = cfg
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1) if cfg.use_post_quant_conv else None
        self.decoder = Decoder(cfg, ops)
        self.bn = BatchStats(4 * cfg.latent_channels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents [B, latent_channels, h, w] -> image [B, 3, h*scale, w*scale] in about [-1, 1]."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, tile: bool | None = None, tile_size: int = 64, tile_overlap: int = 16,
               blend: str = "cosine") -> torch.Tensor:
        """Like forward, optionally over overlapping tiles (sizes in VAE latent pixels); tile=None tiles large inputs."""
        if not tiles(max(z.shape[-2:]), tile):
            return self(z)
        return blend_tiles(self, z, tile_size, tile_overlap, self.config.scale_factor, blend)

    def latents_to_vae(self, packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed transformer latents [B, h*w, 4*latent_channels] -> VAE latents [B, latent_channels, 2h, 2w]."""
        h, w = L.latent_size(height, width)
        c = 4 * self.config.latent_channels
        if packed.ndim != 3 or packed.shape[1:] != (h * w, c):
            raise ValueError(f"latents for {height}x{width} must be [B, {h * w}, {c}], got {tuple(packed.shape)}")
        z = L.bn_denormalize(L.unpack(packed, h, w), self.bn.running_mean, self.bn.running_var,
                             self.config.batch_norm_eps)
        return L.unpatchify(z)

    @torch.inference_mode()
    def pixels(self, packed: torch.Tensor, height: int, width: int, tile: bool | None = None, tile_size: int = 64,
               tile_overlap: int = 16, blend: str = "cosine") -> torch.Tensor:
        """Packed latents [B, N_img, 128] -> uint8 images [B, H, W, 3] on the decoder's device (H, W floored to
        multiples of 16)."""
        z = self.latents_to_vae(packed.to(self.bn.running_mean.device), height, width)
        z = z.to(self.decoder.conv_in.weight.dtype)
        return to_uint8(self.decode(z, tile, tile_size, tile_overlap, blend))

    def decode_latents(self, packed: torch.Tensor, height: int, width: int, tile: bool | None = None,
                       tile_size: int = 64, tile_overlap: int = 16, blend: str = "cosine") -> np.ndarray:
        """`pixels` as a numpy array on the host."""
        return self.pixels(packed, height, width, tile, tile_size, tile_overlap, blend).cpu().numpy()


def decoder_state(state: dict) -> dict:
    """Keep the decode-path keys of a full AutoencoderKLFlux2 state dict; drop the encoder path."""
    return {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES) and k not in IGNORED_KEYS}


def load_vae_decoder(state: dict, config: VAEConfig, device="cpu", dtype: torch.dtype = torch.float32,
                     source="VAE", ops: VaeOps = TORCH_VAE_OPS) -> VAEDecoder:
    """Build the decoder from a full VAE state dict; strict on decoder keys (`bonsai.state.check_state`, naming
    `source`, the file the state came from). `ops`: the decoder steps a backend replaces (see `VaeOps`)."""
    with torch.device("meta"):
        model = VAEDecoder(config, ops)
    given = decoder_state(state)
    check_state(source, {k: v.shape for k, v in model.state_dict().items()}, {k: v.shape for k, v in given.items()})
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in given.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# --- encoder ----------------------------------------------------------------------------------------------------


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # diffusers' Downsample2D(padding=0): pad right/bottom only


class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n_resnets: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(c_in if i == 0 else c_out, c_out, groups) for i in range(n_resnets)]
        )
        self.downsamplers = nn.ModuleList([Downsample(c_out)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chans, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(chans[max(i - 1, 0)], chans[i], cfg.layers_per_block, groups, downsample=i < len(chans) - 1)
            for i in range(len(chans))
        )
        self.mid_block = MidBlock(chans[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = GroupNorm(groups, chans[-1], eps=GN_EPS)
        self.conv_out = nn.Conv2d(chans[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class VAEEncoder(nn.Module):
    """encoder + quant_conv + BN statistics of AutoencoderKLFlux2 (the encode path)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        c2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(c2, c2, 1) if cfg.use_quant_conv else None
        self.bn = BatchStats(4 * cfg.latent_channels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] -> posterior moments [B, 2*latent_channels, H/scale, W/scale] (mean first)."""
        moments = self.encoder(image)
        return moments if self.quant_conv is None else self.quant_conv(moments)

    @torch.inference_mode()
    def encode_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """Image [B, 3, H, W] in [-1, 1] (H, W multiples of 16) -> normalised packed latents [B, H*W/256, 128] float32.

        What Flux2KleinPipeline._encode_vae_image + _pack_latents give: posterior mode, 2x2 patchify, BN normalise.
        """
        multiple = self.config.scale_factor * L.PATCH
        if image.ndim != 4 or image.shape[1] != self.config.in_channels or image.shape[2] % multiple \
                or image.shape[3] % multiple:
            raise BonsaiValueError(f"image must be [B, {self.config.in_channels}, H, W] with H, W multiples of "
                                   f"{multiple}, got {tuple(image.shape)}")
        weight = self.encoder.conv_in.weight
        moments = self(image.to(weight.device, weight.dtype))
        return L.image_tokens(moments, self.bn.running_mean, self.bn.running_var, self.config.batch_norm_eps).float()


ENCODER_PREFIXES = IGNORED_PREFIXES  # what the decoder ignores is the encode path
BN_STATS = ("bn.running_mean", "bn.running_var")  # the encode path normalises with them too


def encoder_state(state: dict) -> dict:
    """Keep the encode-path keys (encoder.*, quant_conv.*, BN statistics) of a full AutoencoderKLFlux2 state dict."""
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIXES) or k in BN_STATS}


def load_vae_encoder(state: dict, config: VAEConfig, device="cpu", dtype: torch.dtype = torch.float32,
                     source: str = "vae") -> VAEEncoder:
    """Build the encoder from a full VAE state dict; strict on the encode-path keys (BonsaiValueError names them)."""
    with torch.device("meta"):
        model = VAEEncoder(config)
    given = encoder_state(state)
    check_state(source, {k: tuple(v.shape) for k, v in model.state_dict().items()},
                {k: tuple(v.shape) for k, v in given.items()}, "VAE encoder state dict")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in given.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
