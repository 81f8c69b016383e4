"""Low-bit weight formats: the canonical in-memory form and its released on-disk layouts."""

from .lowbit import LowBitWeight

__all__ = ["LowBitWeight"]
