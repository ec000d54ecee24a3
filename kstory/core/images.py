"""Image decoding rules shared by every stage: strict decoding, and one way to 8-bit RGB."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile

_KEEP = object()


@contextlib.contextmanager
def strict_decoding(max_pixels: int | None | object = _KEEP) -> Iterator[None]:
    """Make truncated files fail to decode inside the block.

    Importing Data-Juicer sets Pillow's process-wide ``LOAD_TRUNCATED_IMAGES``,
    after which a cut-off file decodes grey-padded instead of failing; any stage
    that runs in the same process (``kstory run``) would then score or train on
    broken pictures. ``max_pixels`` optionally replaces Pillow's bomb limit
    for the block (None: no limit, for callers that check sizes themselves).
    """
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if max_pixels is not _KEEP:
        Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


# Pillow modes that hold more than 8 bits per pixel and that ``convert("RGB")`` clamps instead of scaling.
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
HIGH_BIT_MODES = SIXTEEN_BIT_MODES | {"I", "F"}


class UnsupportedPixels(ValueError):
    """The picture's values have no known white level, so no 8-bit version of it would be faithful."""


def high_bit_source(image: Image.Image) -> str | None:
    """The picture's pixel format when it has more than 8 bits per channel, else None; call before ``load()``.

    For 16-bit grey (and 32-bit integer or float) pictures that is Pillow's
    mode.  16-bit RGB(A) PNGs have no Pillow mode: Pillow reads them as 8-bit
    RGB(A) itself, and only the raw mode of the file's pixel data (e.g.
    ``RGB;16B``) still says so.
    """
    if image.mode in HIGH_BIT_MODES:
        return image.mode
    for tile in getattr(image, "tile", None) or ():
        args = tile[3] if len(tile) > 3 else None  # (codec, extents, offset, args): the raw mode, or a tuple from it
        rawmode = args[0] if isinstance(args, tuple) and args else args
        if isinstance(rawmode, str) and ";16" in rawmode:
            return rawmode
    return None


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` (decoded) as 8-bit RGB, scaling deeper pictures instead of clamping them to white.

    The one rule every stage uses (see docs/data-prep.md, "High bit depth"):

    - 16-bit grey (``I;16``, ``I;16B``...): ``round(v * 255 / 65535)``;
    - 32-bit integer (``I``) has no fixed white level, so its range decides:
      values within 0-255 are taken as 8-bit, within 0-65535 as 16-bit
      (scaled as above); anything else (negative, larger) is refused;
    - float (``F``): values within 0-1 are scaled by 255, within 0-255
      taken as they are (rounded); anything else, or NaN, is refused;
    - 16-bit RGB(A) PNGs arrive as 8-bit already: Pillow keeps the high byte
      (``v >> 8``, at most one level below the rounded value);
    - every other mode: Pillow's ``convert("RGB")`` (alpha is dropped, as
      Data-Juicer's loader does).

    Raises :class:`UnsupportedPixels` (a ValueError) for a refused picture.
    """
    if image.mode == "RGB":
        return image
    if image.mode not in HIGH_BIT_MODES:
        return image.convert("RGB")
    values = np.asarray(image)
    if image.mode in SIXTEEN_BIT_MODES:
        grey = _scale_16_bit(values)
    elif image.mode == "I":
        grey = _scale_integer(values)
    else:
        grey = _scale_float(values)
    return Image.fromarray(grey, "L").convert("RGB")


# round(v * 255 / 65535) for every 16-bit value, in integers: a lookup is ~10x faster than the arithmetic per pixel.
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _scale_16_bit(values: np.ndarray) -> np.ndarray:
    return _SIXTEEN_TO_EIGHT[values.astype(np.intp, copy=False)]


def _scale_integer(values: np.ndarray) -> np.ndarray:
    low, high = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if low < 0 or high > 65535:
        raise UnsupportedPixels(
            f"32-bit integer picture with values {low}..{high}: only 0..255 (8-bit) or 0..65535 (16-bit) "
            "have a known white level"
        )
    return values.astype(np.uint8) if high <= 255 else _scale_16_bit(values)


def _scale_float(values: np.ndarray) -> np.ndarray:
    if values.size and np.isnan(values).any():
        raise UnsupportedPixels("float picture with NaN values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if low < 0 or high > 255:
        raise UnsupportedPixels(
            f"float picture with values {low:g}..{high:g}: only 0..1 or 0..255 have a known white level"
        )
    scale = 255.0 if high <= 1.0 else 1.0
    return np.rint(values.astype(np.float32) * np.float32(scale)).astype(np.uint8)
