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
    shape = (1, channels, h, w)
    if dtype == torch.bfloat16 and channels * h * w >= 16 and _scalar_bf16_randn():
        return randn_bf16_scalar(int(seed), shape)
    generator = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=generator, dtype=dtype)


def _scalar_bf16_randn() -> bool:
    """torch < 2.12 draws bf16 normals on the CPU with scalar bf16 arithmetic (15 ms for a 1024² image's noise on the
    H200's host); 2.12 and 2.13 draw other bits, 2.13 as float32 normals cast to bf16, at float32 speed."""
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 12)


def _to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns, rounded to nearest even as c10::BFloat16(float) does."""
    b = np.asarray(x, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def _from_bf16_bits(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


def _box_muller_bf16_tables() -> tuple[np.ndarray, np.ndarray]:
    """torch < 2.12's bf16 Box-Muller as two [256 * 256] tables of bf16 bits, indexed by (k1 << 8) | k2.

    Its uniforms keep 8 bits of each draw (u = k / 256, exact in bf16) and every step rounds to bf16, so an output
    depends only on the two bytes k1 (radius, from 1 - u) and k2 (angle). The 256 logarithms and 512 angles are
    evaluated in float64 and rounded to float32 (libm's float result), then to bf16 (c10's rounding)."""
    def bf16(x):
        return _from_bf16_bits(_to_bf16_bits(np.asarray(x, np.float64).astype(np.float32)))

    k = np.arange(256, dtype=np.float64)
    log_u1 = bf16(np.log(bf16((256 - k) / 256).astype(np.float64)))
    radius = bf16(np.sqrt(bf16(-2 * log_u1).astype(np.float64)))
    theta = bf16(2 * np.pi * (k / 256)).astype(np.float64)
    cos, sin = bf16(np.cos(theta)), bf16(np.sin(theta))
    tables = []
    for trig in (cos, sin):
        t = _to_bf16_bits(radius[:, None] * trig[None, :]).reshape(-1)  # [k1 * 256 + k2]; the product is exact
        t[(t & 0x7FFF) == 0] = 0  # `* std + mean` with mean 0 turns -0 into +0
        tables.append(t)
    return tables[0], tables[1]


def randn_bf16_scalar(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """torch < 2.12's `torch.randn(shape, generator=manual_seed(seed), dtype=bfloat16)` on the CPU, bit for bit.

    The generator is MT19937 seeded with the seed's low 32 bits, numpy's legacy seeding; each output block of 16
    takes 16 draws, values j and j + 8 from draws j (radius) and j + 8 (angle). A size that is not a multiple of 16
    redraws its last 16 values from 16 more draws.
    """
    n = int(np.prod(shape))
    if n < 16:
        raise BonsaiValueError(f"randn_bf16_scalar needs at least 16 values, got shape {tuple(shape)}")
    cos, sin = _box_muller_bf16_tables()
    m = n - n % 16
    draws = np.random.RandomState(seed & 0xFFFFFFFF).randint(0, 2**32, size=n + (16 if m < n else 0), dtype=np.uint32)
    low = draws.astype("<u4", copy=False).view(np.uint8)[::4]  # each draw's low byte: the uniform's 8 bits
    out = np.empty(n, np.uint16)

    def box_muller(dst, src):
        pairs = src.reshape(-1, 2, 8)  # [block, (radius, angle), 8]
        idx = pairs[:, 0].astype(np.intp)
        idx <<= 8
        idx |= pairs[:, 1]
        block = dst.reshape(-1, 2, 8)
        block[:, 0] = np.take(cos, idx)
        block[:, 1] = np.take(sin, idx)

    box_muller(out[:m], low[:m])
    if m < n:
        box_muller(out[n - 16:], low[n:])
    return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).reshape(shape)


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
