"""bonsai: inference for PrismML's Bonsai Image 4B (FLUX.2 [klein] 4B with binary/ternary weights)."""

from .errors import BonsaiError, BonsaiFileNotFoundError, BonsaiValueError, Cancelled

__all__ = ["Pipeline", "Result", "Report", "metadata", "about", "LowBitWeight", "BonsaiError", "BonsaiValueError",
           "BonsaiFileNotFoundError", "Cancelled"]
__version__ = "0.1.0"

_PIPELINE = ("Pipeline", "Result", "Report", "metadata", "about")


def __getattr__(name):
    # Lazy so that `import bonsai` stays cheap and never imports torch or a backend library.
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    if name == "LowBitWeight":
        from .quant import LowBitWeight

        return LowBitWeight
    raise AttributeError(f"module 'bonsai' has no attribute {name!r}")
