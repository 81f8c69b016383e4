"""Latent glue shared by every backend: seeded noise, 2x2 patch packing, position ids, RoPE tables, BN de-normalisation.

Everything here is torch-CPU or numpy and mirrors diffusers' Flux2KleinPipeline bit for bit, so a seed gives the
same starting noise, and a backend gets the same tables, as the reference CUDA path.
"""

from __future__ import annotations

import numpy as np
import torch

from .errors import BonsaiValueError

PATCH = 2  # the pipeline packs 2x2 VAE latents into one transformer token
VAE_SCALE = 8  # pixels per VAE latent along each side


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Pixels -> transformer token grid (h, w) = (H // 16, W // 16), floored like diffusers' prepare_latents."""
    for name, v in (("height", height), ("width", width)):
        if int(v) < VAE_SCALE * PATCH:
            raise ValueError(f"{name} must be at least {VAE_SCALE * PATCH} pixels, got {v}")
    return int(height) // (VAE_SCALE * PATCH), int(width) // (VAE_SCALE * PATCH)


def noise(seed: int, height: int, width: int, dtype: torch.dtype = torch.float32, channels: int = 128) -> torch.Tensor:
    """Starting noise [1, channels, H/16, W/16] on the CPU, drawn as diffusers does with a CPU generator.

    diffusers draws directly in the prompt-embeds dtype (bf16 for klein), so pass the dtype of the path to match.
    """
    h, w = latent_size(height, width)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn((1, channels, h, w), generator=generator, dtype=dtype)


def pack(z: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> tokens [B, h*w, C] in row-major (h, w) order."""
    if z.ndim != 4:
        raise ValueError(f"pack expects [B, C, h, w], got shape {tuple(z.shape)}")
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Tokens [B, h*w, C] -> [B, C, h, w]."""
    if x.ndim != 3 or x.shape[1] != h * w:
        raise ValueError(f"unpack expects [B, {h}*{w}={h * w}, C], got shape {tuple(x.shape)}")
    b, _, c = x.shape
    return x.reshape(b, h, w, c).permute(0, 3, 1, 2)


def img_ids(h: int, w: int) -> torch.Tensor:
    """Image token positions [h*w, 4] int64 = (t=0, row, col, l=0), row-major."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    zeros = torch.zeros(h * w, dtype=torch.int64)
    return torch.stack([zeros, rows, cols, zeros], dim=1)


def txt_ids(n: int) -> torch.Tensor:
    """Text token positions [n, 4] int64 = (0, 0, 0, l)."""
    ids = torch.zeros(n, 4, dtype=torch.int64)
    ids[:, 3] = torch.arange(n)
    return ids


def rope_tables(ids, axes_dims, theta: float):
    """Positions [N, n_axes] -> (cos, sin) float32 [N, sum(axes_dims)], each angle repeated for its (2j, 2j+1) pair.

    Computed in float64 and cast, as diffusers' Flux2PosEmbed does on CPU/CUDA. Returns numpy arrays for a
    numpy input and CPU torch tensors otherwise.
    """
    as_numpy = isinstance(ids, np.ndarray)
    pos = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids)
    if pos.ndim != 2 or pos.shape[1] < len(axes_dims):
        raise ValueError(f"ids must be [N, >= {len(axes_dims)}], got shape {pos.shape}")
    # The reference rounds positions to float32 before the float64 product.
    pos = pos.astype(np.float32).astype(np.float64)
    cos, sin = [], []
    for axis, dim in enumerate(axes_dims):
        if dim % 2:
            raise ValueError(f"axes_dims must be even, got {tuple(axes_dims)}")
        freqs = 1.0 / (float(theta) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))  # [dim/2]
        angles = np.outer(pos[:, axis], freqs)  # [N, dim/2]
        cos.append(np.repeat(np.cos(angles), 2, axis=1))
        sin.append(np.repeat(np.sin(angles), 2, axis=1))
    cos = np.concatenate(cos, axis=1).astype(np.float32)
    sin = np.concatenate(sin, axis=1).astype(np.float32)
    if as_numpy:
        return cos, sin
    return torch.from_numpy(cos), torch.from_numpy(sin)


def bn_stats(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
    """The VAE BatchNorm's per-channel (mean, std) [1, C, 1, 1] in x's dtype, for patchified latents [B, C, h, w].

    sqrt in the statistics' own dtype, then cast, as the reference pipeline does.
    """
    if x.ndim != 4 or x.shape[1] != running_mean.numel() or running_var.numel() != running_mean.numel():
        raise BonsaiValueError(f"VAE latents {tuple(x.shape)} must be [B, C, h, w] with C = {running_mean.numel()} "
                               f"(running_mean) = {running_var.numel()} (running_var)")
    mean = running_mean.reshape(1, -1, 1, 1).to(x.device, x.dtype)
    std = torch.sqrt(running_var.reshape(1, -1, 1, 1) + eps).to(x.device, x.dtype)
    return mean, std


def bn_denormalize(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """Undo the VAE BatchNorm on patchified latents [B, 128, h, w]: x * sqrt(var + eps) + mean, per channel."""
    mean, std = bn_stats(x, running_mean, running_var, eps)
    return x * std + mean


def patchify(z: torch.Tensor) -> torch.Tensor:
    """[B, C, 2h, 2w] -> [B, 4C, h, w], channel index c*4 + dy*2 + dx."""
    b, c, hh, ww = z.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"patchify needs even spatial size, got {hh}x{ww}")
    z = z.reshape(b, c, hh // 2, 2, ww // 2, 2).permute(0, 1, 3, 5, 2, 4)  # [B, C, dy, dx, h, w]
    return z.reshape(b, c * 4, hh // 2, ww // 2)


def unpatchify(z: torch.Tensor) -> torch.Tensor:
    """[B, 4C, h, w] -> [B, C, 2h, 2w], inverse of `patchify`."""
    b, c4, h, w = z.shape
    if c4 % 4:
        raise ValueError(f"unpatchify needs channels divisible by 4, got {c4}")
    z = z.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)  # [B, C, h, dy, w, dx]
    return z.reshape(b, c4 // 4, 2 * h, 2 * w)


# --- image inputs (reference images, image-to-image) ------------------------------------------------------------

REFERENCE_T_SCALE = 10  # reference image i (0-based) sits at time coordinate t = 10 * (i + 1)


def posterior_mode(moments: torch.Tensor) -> torch.Tensor:
    """VAE posterior moments [B, 2C, h, w] (mean, log-variance) -> its mode, the mean [B, C, h, w]."""
    if moments.ndim != 4 or moments.shape[1] % 2:
        raise BonsaiValueError(f"posterior moments must be [B, 2C, h, w], got shape {tuple(moments.shape)}")
    return moments[:, : moments.shape[1] // 2]


def bn_normalize(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor, eps: float) -> torch.Tensor:
    """The VAE BatchNorm on patchified latents [B, 128, h, w]: (x - mean) / sqrt(var + eps), per channel."""
    mean, std = bn_stats(x, running_mean, running_var, eps)
    return (x - mean) / std


def image_tokens(moments: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """VAE posterior moments [B, 2C, 2h, 2w] -> packed, normalised latents [B, h*w, 4C].

    Flux2KleinPipeline._encode_vae_image (mode, patchify, BN normalise) followed by _pack_latents.
    """
    return pack(bn_normalize(patchify(posterior_mode(moments)), running_mean, running_var, eps))


def reference_ids(sizes) -> torch.Tensor:
    """Token grids [(h, w), ...] of the reference images, in order -> positions [sum h*w, 4] int64.

    Reference i gets (t = 10 * (i + 1), row, col, 0), as Flux2KleinPipeline._prepare_image_ids builds them.
    """
    parts = []
    for i, (h, w) in enumerate(sizes):
        ids = img_ids(h, w)
        ids[:, 0] = REFERENCE_T_SCALE * (i + 1)
        parts.append(ids)
    if not parts:
        raise BonsaiValueError("reference_ids needs at least one (h, w) grid")
    return torch.cat(parts, dim=0)


def join_references(x: torch.Tensor, ids: torch.Tensor, ref_tokens: torch.Tensor,
                    ref_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The transformer input of Flux2KleinPipeline with reference images: the references appended to the sequence.

    x [B, N, C], ids [N, 4]; ref_tokens [1 or B, M, C], ref_ids [M, 4] -> ([B, N+M, C] in x's dtype, [N+M, 4]).
    The same timestep applies to every token; the velocity of x is the first N output tokens.
    """
    if (ref_tokens.ndim != 3 or ref_tokens.shape[2] != x.shape[2]
            or ref_ids.shape != (ref_tokens.shape[1], ids.shape[1])):
        raise BonsaiValueError(f"reference tokens {tuple(ref_tokens.shape)} / ids {tuple(ref_ids.shape)} do not fit "
                         f"image tokens {tuple(x.shape)} / ids {tuple(ids.shape)}")
    ref_tokens = ref_tokens.to(x.device, x.dtype).expand(x.shape[0], -1, -1)
    return torch.cat([x, ref_tokens], dim=1), torch.cat([ids, ref_ids.to(ids.device)], dim=0)
