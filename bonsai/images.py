"""Input images -> [-1, 1] tensors, as diffusers' FLUX.2 [klein] pipelines prepare them (PIL, numpy, torch CPU).

Reference images (editing): `Flux2KleinPipeline(image=...)`: Flux2ImageProcessor.check_image_input, then an area cap
of 1024*1024 (LANCZOS), sides floored to multiples of 16 by a centre crop, RGB, x / 255 * 2 - 1.
Init image (image-to-image): `Flux2KleinInpaintPipeline(image=...)`: the same area cap, then a LANCZOS resize (not a
crop) to the sides floored to multiples of 16.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from . import sizes
from .errors import BonsaiValueError

MAX_REFERENCES = 4  # BFL's limit for FLUX.2 [klein] 4B (docs.bfl.ml, image editing); diffusers itself sets none
MAX_AREA = 1024 * 1024  # larger inputs are scaled down to this many pixels first
MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input: min_side_length
MAX_ASPECT = 8  # Flux2ImageProcessor.check_image_input: max_aspect_ratio


def _check_image(image, name: str, min_side: int) -> None:
    if not isinstance(image, Image.Image):
        raise BonsaiValueError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    w, h = image.size
    if w == 0 or h == 0:
        raise BonsaiValueError(f"{name} has size 0 ({w}x{h})")
    if w < min_side or h < min_side:
        raise BonsaiValueError(f"{name} is too small: {w}x{h}; both sides must be at least {min_side} pixels")
    if max(w / h, h / w) > MAX_ASPECT:
        raise BonsaiValueError(f"{name} aspect ratio is too extreme: {w}x{h}; at most {MAX_ASPECT}:1")
    try:
        image.crop((0, 0, 1, 1)).convert("RGB")
    except (ValueError, OSError) as e:
        raise BonsaiValueError(f"{name} has mode {image.mode!r}, which cannot be converted to RGB: {e}") from None


def check_references(image, name: str = "image", max_count: int = MAX_REFERENCES) -> list[Image.Image]:
    """One PIL image or a list of them -> the list, every image checked before any is used.

    Raises BonsaiValueError naming `name` (and the index) for: not PIL, size 0, a side under 64 pixels, an aspect
    ratio over 8:1, a mode that cannot become RGB, an empty list, more than `max_count` images.
    """
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    if not images:
        raise BonsaiValueError(f"{name} is an empty list; pass a PIL image or a list of 1 to {max_count}")
    if len(images) > max_count:
        raise BonsaiValueError(
            f"{name}: {len(images)} reference images given; FLUX.2 [klein] takes at most {max_count}")
    for i, img in enumerate(images):
        _check_image(img, f"{name}[{i}]" if isinstance(image, (list, tuple)) else name, MIN_SIDE)
    return images


def _cap_area(image: Image.Image) -> Image.Image:
    """Scale an image of more than MAX_AREA pixels down to about MAX_AREA, keeping its aspect (sides truncated)."""
    w, h = image.size
    if w * h <= MAX_AREA:
        return image
    scale = math.sqrt(MAX_AREA / (w * h))
    return image.resize((int(w * scale), int(h * scale)), Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> float32 [1, 3, H, W] in [-1, 1] (RGB conversion, x / 255, then 2x - 1, as VaeImageProcessor)."""
    x = np.array(image.convert("RGB")).astype(np.float32) / 255.0  # [H, W, 3]
    return 2.0 * torch.from_numpy(x).permute(2, 0, 1)[None] - 1.0


def reference_tensor(image: Image.Image) -> torch.Tensor:
    """One checked reference image -> float32 [1, 3, H, W] in [-1, 1], H and W multiples of 16.

    Area capped at 1024*1024 (LANCZOS), then centre-cropped to the sides floored to multiples of 16.
    """
    image = _cap_area(image)
    w, h = image.size
    w16, h16 = w // sizes.MULTIPLE * sizes.MULTIPLE, h // sizes.MULTIPLE * sizes.MULTIPLE
    left, top = (w - w16) // 2, (h - h16) // 2
    return to_tensor(image.crop((left, top, left + w16, top + h16)))


def reference_tensors(image, name: str = "image", max_count: int = MAX_REFERENCES) -> list[torch.Tensor]:
    """`image=` of the pipeline (PIL or list of PIL) -> one [1, 3, H_i, W_i] tensor per reference, sizes may differ.

    All images are checked first (see check_references). Without an explicit output size, diffusers renders at the
    size of the first reference: (W_0, H_0) of the first tensor.
    """
    return [reference_tensor(img) for img in check_references(image, name, max_count)]


def init_tensor(image, width: int | None = None, height: int | None = None, name: str = "init_image") -> torch.Tensor:
    """The image-to-image start image -> float32 [1, 3, H, W] in [-1, 1]; (W, H) is also the output size.

    Without width/height: area capped at 1024*1024, then resized (LANCZOS) to the sides floored to multiples of 16,
    as Flux2KleinInpaintPipeline does. With both: resized to (width, height), multiples of 16, as
    FluxImg2ImgPipeline does with an explicit size.
    """
    _check_image(image, name, sizes.MIN_SIZE)
    if (width is None) != (height is None):
        raise BonsaiValueError(f"{name}: give both width and height or neither, got width={width}, height={height}")
    if width is None:
        image = _cap_area(image)
        width = image.width // sizes.MULTIPLE * sizes.MULTIPLE
        height = image.height // sizes.MULTIPLE * sizes.MULTIPLE
    sizes.check_size(width, height)
    return to_tensor(image.resize((width, height), Image.Resampling.LANCZOS))
