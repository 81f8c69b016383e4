"""Bit packing along the last dim: LSB-first codes in bytes, and 5 base-3 trits per byte."""

from __future__ import annotations

import torch

TRITS_PER_BYTE = 5  # 3**5 = 243 <= 256


def pack_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., K] in [0, 2**bits) -> uint8 [..., K * bits / 8], element j at bit (j % per) * bits."""
    per = 8 // bits
    if q.shape[-1] % per:
        raise ValueError(f"last dim {q.shape[-1]} is not a multiple of {per} ({bits}-bit codes per byte)")
    grouped = q.to(torch.uint8).reshape(*q.shape[:-1], q.shape[-1] // per, per)  # [..., K/per, per]
    out = grouped[..., 0].clone()
    for i in range(1, per):  # disjoint bit fields: OR them in place, no wide intermediate
        out |= grouped[..., i] << (i * bits)
    return out


def unpack_bits(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., B] -> uint8 codes [..., B * 8 / bits]."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    q = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., B, per]
    return q.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def has_code3(packed: torch.Tensor) -> bool:
    """Whether any 2-bit code in uint8 bytes is 3 (both bits of a slot set), without unpacking."""
    return bool((packed & (packed >> 1) & 0x55).any())


def pack_trits(q: torch.Tensor) -> torch.Tensor:
    """uint8 trits [..., K] in {0, 1, 2} -> uint8 [..., ceil(K / 5)], byte = sum q_i * 3**i (zero-padded)."""
    k = q.shape[-1]
    pad = -k % TRITS_PER_BYTE
    q = torch.nn.functional.pad(q.to(torch.int32), (0, pad))
    grouped = q.reshape(*q.shape[:-1], -1, TRITS_PER_BYTE)  # [..., ceil(K/5), 5]
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=q.device)
    return (grouped * powers).sum(-1).to(torch.uint8)


def unpack_trits(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [..., ceil(K / 5)] -> uint8 trits [..., K]. Bytes above 242 are invalid and raise."""
    if packed.numel() and int(packed.max()) >= 3**TRITS_PER_BYTE:
        raise ValueError(f"trit byte {int(packed.max())} is out of range (max 242)")
    v = packed.to(torch.int32).unsqueeze(-1)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=packed.device)
    q = (v // powers) % 3  # [..., B, 5]
    return q.reshape(*packed.shape[:-1], -1)[..., :k].to(torch.uint8)
