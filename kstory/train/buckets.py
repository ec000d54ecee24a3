"""Aspect-ratio buckets: train on every image at roughly its own shape instead of cropping it square.

All buckets have about ``resolution**2`` pixels (so a batch costs about the
same whatever its shape) and sides that are multiples of 64, which the Kolors
UNet needs (8x VAE downscale, then three 2x UNet levels).
"""

from __future__ import annotations

import math

from PIL import Image

STEP = 64
MAX_ASPECT = 2.0  # widest bucket is 2:1 (and tallest 1:2), as in common SDXL trainers

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Sizes (w, h), multiples of 64, with w*h <= resolution**2 and aspect within 1/max_aspect..max_aspect."""
    area = resolution * resolution
    sizes: set[Size] = {(resolution, resolution)}
    width = STEP
    while width <= resolution * max_aspect:
        height = (area // width) // STEP * STEP
        if height >= STEP and 1 / max_aspect <= width / height <= max_aspect:
            sizes.add((width, height))
            sizes.add((height, width))
        width += STEP
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0]))


def nearest_bucket(width: int, height: int, sizes: list[Size]) -> Size:
    """The bucket whose aspect ratio is closest to the image's (in log space, so 2:1 and 1:2 are symmetric)."""
    aspect = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))


def target_size(width: int, height: int, resolution: int, center_crop: bool) -> Size:
    """Training size for an image: the square crop, or its aspect-ratio bucket."""
    if center_crop:
        return (resolution, resolution)
    return nearest_bucket(width, height, bucket_sizes(resolution))


def fit_to(image: Image.Image, size: Size) -> Image.Image:
    """Resize to cover ``size`` (keeping aspect), then crop the centre to exactly ``size``."""
    width, height = size
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return image.crop((left, top, left + width, top + height))
