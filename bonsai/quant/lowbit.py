"""`LowBitWeight`: one in-memory form for a group-wise binary or ternary weight, and its released layouts.

Canonical storage: `packed` uint8 [out, in * bits / 8] with codes LSB-first along `in` (ternary: 2 bits, q = t + 1;
binary: 1 bit, q = (b + 1) / 2) and `scales` float32 [out, in // group_size], so W[o, j] = t[o, j] * s[o, j // g].
The MLX uint32 words are these bytes read little-endian, and gemlite's 8-bit packing is their transpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import BonsaiValueError
from ..layouts import GEMLITE_MODE_FMA, GemliteMeta, Kind
from ..state import nonfinite_at
from .packing import has_code3, pack_bits, pack_trits, unpack_bits, unpack_trits


def _check(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise BonsaiValueError(f"{where}: {msg}")


def _check_finite(t, where: str) -> None:
    at = nonfinite_at(t)
    if at is not None:
        raise BonsaiValueError(f"{where}: holds NaN or inf (first at {list(at)})")


def _check_groups(got, want, where: str, rule: str) -> None:
    """got == want for every group ([out, in / group_size], torch or numpy), else name the first that differs."""
    if torch.equal(got, want) if isinstance(got, torch.Tensor) else np.array_equal(got, want):
        return
    bad = got != want
    row, group = (int(i) for i in (bad.nonzero()[0] if isinstance(bad, torch.Tensor) else np.argwhere(bad)[0]))
    raise BonsaiValueError(f"{where}: {rule}; row {row}, group {group} breaks it: {float(got[row, group]):.6g}, "
                           f"expected {float(want[row, group]):.6g}")


def check_mlx_affine(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int = 128,
                     name: str = "weight") -> Kind:
    """Validate one released MLX low-bit linear and return its kind; shared by the torch and MLX readers.

    weight uint32 [out, in*bits/32]; scales, biases [out, in/group_size] as numpy (bf16 as exact float32).
    Ternary (bits 2): biases == -scales and no 2-bit code 3; binary (bits 1): biases == -scales / 2.
    """
    kind = Kind.from_bits(bits, f"{name}: bits")
    _check(weight.dtype == np.uint32 and weight.ndim == 2, f"{name}.weight",
           f"must be a 2-D uint32 array, got {weight.dtype} {tuple(weight.shape)}")
    out, words = weight.shape
    k = words * 32 // bits
    _check(k % group_size == 0, f"{name}.weight", f"in_features {k} is not a multiple of group_size {group_size}")
    for key, t in (("scales", scales), ("biases", biases)):
        _check(tuple(t.shape) == (out, k // group_size), f"{name}.{key}", f"shape {tuple(t.shape)}, expected "
               f"{(out, k // group_size)} for a {bits}-bit weight {tuple(weight.shape)}")
    for key, t in (("scales", scales), ("biases", biases)):
        _check(np.issubdtype(t.dtype, np.floating), f"{name}.{key}", f"must be a float array, got {t.dtype}")
        _check_finite(t, f"{name}.{key}")
    s, b = scales.astype(np.float32), biases.astype(np.float32)  # exact: halving and negation in float32
    if kind == "ternary":
        _check_groups(b, -s, f"{name}.biases", "ternary packs need biases == -scales (W = (q - 1) * s)")
        codes = np.ascontiguousarray(weight).view(np.uint8)  # little-endian words -> bytes, LSB-first
        _check(not has_code3(codes), f"{name}.weight", "ternary code 3 is not a valid trit")
    else:
        _check_groups(b, -s / 2, f"{name}.biases", "binary packs need biases == -scales / 2 (W = (2q - 1) * s)")
    return kind


def _numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16; float32 holds it exactly


@dataclass(frozen=True, eq=False)
class LowBitWeight:
    kind: Kind
    packed: torch.Tensor  # uint8 [out, in * bits / 8]
    scales: torch.Tensor  # float32 [out, in // group_size]
    group_size: int = 128

    def __post_init__(self):
        Kind.parse(self.kind, "LowBitWeight")
        _check(self.packed.dtype == torch.uint8 and self.packed.ndim == 2, "LowBitWeight",
               f"packed must be a 2-D uint8 tensor, got {self.packed.dtype} {tuple(self.packed.shape)}")
        out, k = self.shape
        _check(k % self.group_size == 0, "LowBitWeight", f"in_features {k} is not a multiple of group_size {self.group_size}")
        _check(self.scales.dtype == torch.float32 and tuple(self.scales.shape) == (out, k // self.group_size),
               "LowBitWeight", f"scales must be float32 {(out, k // self.group_size)}, got {self.scales.dtype} "
               f"{tuple(self.scales.shape)}")

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def bits(self) -> int:
        return Kind(self.kind).bits

    @property
    def shape(self) -> tuple[int, int]:
        return (self.packed.shape[0], self.packed.shape[1] * 8 // self.bits)

    @property
    def codes(self) -> torch.Tensor:
        """int8 [out, in] in {-1, 0, +1} (ternary) or {-1, +1} (binary)."""
        q = unpack_bits(self.packed, self.bits).to(torch.int8)
        return q - 1 if self.kind == "ternary" else 2 * q - 1

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense [out, in]. Exact in float32; in 16-bit it is t * round(s), exact for bf16-representable s."""
        out, k = self.shape
        t = self.codes.to(torch.float32).view(out, k // self.group_size, self.group_size)  # [out, G, g]
        return (t * self.scales.unsqueeze(-1)).view(out, k).to(dtype)

    def to(self, device) -> "LowBitWeight":
        return LowBitWeight(self.kind, self.packed.to(device), self.scales.to(device), self.group_size)

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales.numel() * 4

    # -- constructors --------------------------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, kind: str, group_size: int = 128,
                   name: str = "weight") -> "LowBitWeight":
        """codes: int [out, in] in the kind's value set; scales: [out, in // group_size]."""
        kind = Kind.parse(kind, name)
        allowed = (-1, 0, 1) if kind == "ternary" else (-1, 1)
        bad = (codes < -1) | (codes > 1) if kind == "ternary" else (codes != 1) & (codes != -1)
        if bool(bad.any()):
            raise BonsaiValueError(f"{name}: {kind} codes must be in {allowed}, found {int(codes[bad][0])}")
        q = (codes.to(torch.int8) + 1).view(torch.uint8)
        q = q if kind == "ternary" else q >> 1
        return cls(kind, pack_bits(q, kind.bits), scales.to(torch.float32).contiguous(), group_size)

    @classmethod
    def quantize(cls, dense: torch.Tensor, kind: str, group_size: int = 128) -> "LowBitWeight":
        """Our quantizer (see docs/formats.md). A weight that already is s * codes per group comes back bit-exactly.

        ternary: threshold 0.7 * mean|w| per group (TWN), s = mean |w| over the kept weights;
        binary: sign (0 -> +1), s = mean |w|. When every kept |w| of a group is equal, s is that value exactly.
        """
        Kind.parse(kind, "quantize")
        _check(dense.ndim == 2 and dense.shape[1] % group_size == 0, "quantize",
               f"weight must be [out, in] with in a multiple of {group_size}, got {tuple(dense.shape)}")
        out, k = dense.shape
        w = dense.detach().to(torch.float64).reshape(out, k // group_size, group_size)  # [out, G, g]
        a = w.abs()
        if kind == "ternary":
            keep = a > 0.7 * a.mean(-1, keepdim=True)
            t = torch.sign(w) * keep
        else:
            keep = torch.ones_like(a, dtype=torch.bool)
            t = torch.where(w < 0, -1.0, 1.0)
        n = keep.sum(-1)
        mean = (a * keep).sum(-1) / n.clamp(min=1)
        amax = a.masked_fill(~keep, 0).amax(-1)
        amin = a.masked_fill(~keep, float("inf")).amin(-1)
        s = torch.where(amax == amin, amax, mean).masked_fill(n == 0, 0.0)
        return cls.from_codes(t.reshape(out, k), s.to(torch.float32), kind, group_size)

    # -- gemlite (transformer-gemlite-int{1,2}/state_dict.pt) ---------------------------------------------------
    @classmethod
    def from_gemlite(cls, W_q, scales, zeros, metadata, orig_shape, name: str = "weight") -> "LowBitWeight":
        """Tensors as stored per linear in a released gemlite state_dict (W_group_mode 4: W = q * scales + zeros)."""
        meta = GemliteMeta.from_tensor(metadata, f"{name}.metadata")
        bits, group_size, eps = meta.W_nbits, meta.group_size, meta.elements_per_sample
        kind = Kind.from_bits(bits, f"{name}.metadata.W_nbits")
        _check(meta.unpack_mask == (1 << bits) - 1, f"{name}.metadata.unpack_mask",
               f"{meta.unpack_mask} != {(1 << bits) - 1} for {bits}-bit")
        _check(meta.W_group_mode == GEMLITE_MODE_FMA, f"{name}.metadata.W_group_mode",
               f"must be 4 (q*scales+zeros), got {meta.W_group_mode}")
        shape = [int(v) for v in torch.as_tensor(orig_shape).flatten().tolist()]
        _check(len(shape) == 2, f"{name}.orig_shape", f"expected [out, in], got {shape}")
        out, k = shape
        width = W_q.element_size() * 8
        _check(W_q.dtype in (torch.uint8, torch.int32), f"{name}.W_q", f"dtype must be uint8 or int32, got {W_q.dtype}")
        _check(eps == width // bits, f"{name}.metadata.elements_per_sample",
               f"elements_per_sample {eps} does not match {W_q.dtype} W_q with {bits}-bit codes ({width // bits})")
        _check(k % group_size == 0 and k % eps == 0, f"{name}.orig_shape", f"in={k} not a multiple of {group_size}")
        _check(tuple(W_q.shape) == (k // eps, out), f"{name}.W_q",
               f"shape {tuple(W_q.shape)} does not match orig_shape {shape}: expected [in/{eps}, out] = {(k // eps, out)}")
        for key, t in (("scales", scales), ("zeros", zeros)):
            _check(tuple(t.shape) == (k // group_size, out), f"{name}.{key}",
                   f"shape {tuple(t.shape)}, expected [in/{group_size}, out] = {(k // group_size, out)}")
            _check(t.is_floating_point(), f"{name}.{key}", f"must be a float tensor, got {t.dtype}")
            _check_finite(t, f"{name}.{key}")
        # [in/eps, out] -> [out, in/eps]; int32 words are little-endian bytes in the same LSB-first order.
        packed = W_q.t().contiguous().view(torch.uint8)
        s, z = scales.t().to(torch.float32), zeros.t().to(torch.float32)
        if kind == "ternary":
            _check_groups(z, -s, f"{name}.zeros", "ternary packs need zeros == -scales (W = (q - 1) * s)")
            _check(not has_code3(packed), f"{name}.W_q", "ternary code 3 is not a valid trit")
        else:
            _check_groups(z, -s / 2, f"{name}.zeros", "binary packs need zeros == -scales / 2 (W = (2q - 1) * s)")
            s = s / 2
        return cls(kind, packed, s.contiguous(), group_size)

    def to_gemlite(self) -> dict[str, torch.Tensor]:
        """The released gemlite layout (8-bit packing, float32 meta, fma mode)."""
        out, k = self.shape
        s = self.scales if self.kind == "ternary" else 2 * self.scales
        z = -self.scales
        return {
            "W_q": self.packed.t().contiguous(),  # [in/eps, out]
            "scales": s.t().contiguous(),  # [in/g, out]
            "zeros": z.t().contiguous(),
            "metadata": GemliteMeta.released(self.bits, self.group_size).to_tensor(),
            "orig_shape": torch.tensor([out, k], dtype=torch.int32),
        }

    # -- MLX (transformer-packed-mflux/*.safetensors) -----------------------------------------------------------
    @classmethod
    def from_mlx(cls, weight, scales, biases, bits: int, group_size: int = 128, name: str = "weight") -> "LowBitWeight":
        """MLX affine tensors: uint32 weight [out, in*bits/32], bf16 scales and biases [out, in/group_size]."""
        kind = check_mlx_affine(_numpy(weight), _numpy(scales), _numpy(biases), bits, group_size, name)
        packed = weight.contiguous().view(torch.uint8)  # little-endian words -> bytes, same LSB-first order
        s = scales.to(torch.float32)
        return cls(kind, packed, (s if kind == "ternary" else s / 2).contiguous(), group_size)

    def to_mlx(self) -> dict[str, torch.Tensor]:
        """The released MLX layout. Raises if a scale is not exactly representable in bf16."""
        s = self.scales if self.kind == "ternary" else 2 * self.scales
        s16 = s.to(torch.bfloat16)
        _check(torch.equal(s16.float(), s), "to_mlx", "scales are not exactly representable in bfloat16 (MLX stores "
               "bf16 scales); converting would change the weights")
        return {"weight": self.packed.view(torch.uint32), "scales": s16, "biases": (-self.scales).to(torch.bfloat16)}

    # -- compact (ours: 5 trits per byte for ternary, 1 bit for binary) ----------------------------------------
    def to_compact(self) -> dict[str, torch.Tensor]:
        """codes uint8 (ternary [out, ceil(in/5)], binary [out, in/8]) and scales in the narrowest exact float."""
        codes = pack_trits(unpack_bits(self.packed, 2)) if self.kind == "ternary" else self.packed
        scales = next(s for s in (self.scales.to(d) for d in (torch.float16, torch.bfloat16, torch.float32))
                      if torch.equal(s.float(), self.scales))
        return {"codes": codes, "scales": scales}

    @classmethod
    def from_compact(cls, codes, scales, kind: str, in_features: int, group_size: int = 128,
                     name: str = "weight") -> "LowBitWeight":
        kind = Kind.parse(kind, name)
        out = codes.shape[0]
        expected = (out, -(-in_features // 5)) if kind == "ternary" else (out, in_features // 8)
        _check(codes.dtype == torch.uint8 and tuple(codes.shape) == expected, f"{name}.codes",
               f"expected uint8 {expected}, got {codes.dtype} {tuple(codes.shape)}")
        try:
            packed = pack_bits(unpack_trits(codes, in_features), 2) if kind == "ternary" else codes.contiguous()
        except ValueError as e:
            raise BonsaiValueError(f"{name}.codes: {e}") from None
        _check(tuple(scales.shape) == (out, in_features // group_size) and scales.is_floating_point(),
               f"{name}.scales", f"expected float {(out, in_features // group_size)}, got {scales.dtype} "
               f"{tuple(scales.shape)}")
        _check_finite(scales, f"{name}.scales")
        return cls(kind, packed, scales.to(torch.float32).contiguous(), group_size)
