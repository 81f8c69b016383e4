"""bonsai: inference for PrismML's Bonsai Image 4B (FLUX.2 [klein] 4B with binary/ternary weights)."""

__all__ = ["Pipeline", "Result", "LowBitWeight"]
__version__ = "0.1.0"


def __getattr__(name):
    # Lazy so that `import bonsai` stays cheap and never imports a backend library.
    if name in ("Pipeline", "Result"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "LowBitWeight":
        from .quant import LowBitWeight

        return LowBitWeight
    raise AttributeError(f"module 'bonsai' has no attribute {name!r}")
