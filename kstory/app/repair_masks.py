"""The Repair page's masks: a rectangle or ellipse from sliders, an uploaded picture, and the tinted preview.

The page writes the mask it inpaints with into ``RUN/masks/`` (``NN-shape.png``
for a shape, ``NN-upload.png`` for an upload), so the inpaint job reads it from
a file exactly as ``kstory inpaint --mask`` does (kstory.story.masks.read_mask:
resized, thresholded, checked); the repair then keeps its own binary copy in
``story/repairs/``, which ``kstory package`` ships.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kstory.core import atomic
from kstory.core.errors import KstoryError
from kstory.story.manifest import frame_name, png_bytes
from kstory.story.masks import Mask, crop_box, feathered

MASKS_DIR = "masks"
SHAPES = ("rectangle", "ellipse")
SOURCES = ("shape", "upload")
TINT = np.array((255, 40, 40), np.float32)  # the region to repaint; it fades out over the feather
TINT_ALPHA = 0.6
KEPT_DIM = 0.5  # pixels the repair cannot change (beyond the feather) are shown this bright
CROP_OUTLINE = (255, 220, 0)  # the box inpainted at full resolution when a crop padding is set
PREVIEW = 384  # small frames are enlarged (nearest neighbour) to at least this many pixels for viewing


def draft_path(run_root: Path, frame: int, source: str) -> Path:
    """Where the page keeps frame ``frame``'s mask of the given source ('shape' or 'upload')."""
    if source not in SOURCES:
        raise KstoryError(f"unknown mask source {source!r}", fix=f"use one of {', '.join(SOURCES)}")
    return Path(run_root) / MASKS_DIR / f"{frame_name(frame)}-{source}.png"


def shape_mask(size: tuple[int, int], shape: str, box: tuple[int, int, int, int]) -> Mask:
    """A ``shape`` ('rectangle' or 'ellipse') filling ``box`` = (x, y, width, height) in pixels of a frame of
    ``size`` (width, height); the part outside the frame is cut off."""
    if shape not in SHAPES:
        raise KstoryError(f"unknown mask shape {shape!r}", fix=f"use one of {', '.join(SHAPES)}")
    x, y, width, height = (int(v) for v in box)
    if width < 1 or height < 1:
        raise KstoryError(f"the {shape} is {width}x{height} pixels", fix="give it a width and height of 1 or more")
    image = Image.new("L", tuple(size), 0)
    bounds = (x, y, x + width - 1, y + height - 1)
    draw = ImageDraw.Draw(image)
    (draw.rectangle if shape == "rectangle" else draw.ellipse)(bounds, fill=255)
    pixels = np.asarray(image) >= 128
    if not pixels.any():
        raise KstoryError(f"the {shape} lies outside the {size[0]}x{size[1]} frame",
                          fix="move it inside the frame (x below the width, y below the height)")
    return Mask(pixels, None, None)


def save_mask(mask: Mask, path: Path) -> Path:
    """The binary mask as a PNG at ``path`` (written atomically)."""
    return atomic.write_bytes(path, png_bytes(mask.image()))


def save_upload(data: bytes, path: Path) -> bool:
    """An uploaded mask's bytes as they came, at ``path``; False when the file already holds them."""
    path = Path(path)
    if path.is_file() and path.read_bytes() == data:
        return False
    atomic.write_bytes(path, data)
    return True


def stored_mask(path: Path, size: tuple[int, int]) -> Mask | None:
    """The binary mask a repair stored (``story/repairs/NN-K-mask.png``), or None if unreadable or not frame-sized."""
    try:
        with Image.open(path) as handle:
            grey = handle.convert("L")
    except (OSError, ValueError):
        return None
    return Mask(np.asarray(grey) >= 128, None, None) if grey.size == tuple(size) else None


def preview(frame: Image.Image, mask: Mask, feather: int, crop_padding: int | None = None) -> Image.Image:
    """``frame`` tinted where the inpaint repaints: full tint on the mask, fading over the ``feather`` pixels
    around it (the same weights the repair blends with); the pixels it keeps exactly are dimmed, and the crop
    box is outlined when ``crop_padding`` is set."""
    weights = feathered(mask.pixels, feather)
    alpha = (TINT_ALPHA * weights)[..., None]
    pixels = np.asarray(frame.convert("RGB"), np.float32)
    tinted = np.where(alpha > 0, pixels * (1 - alpha) + TINT * alpha, pixels * KEPT_DIM)
    image = Image.fromarray(np.rint(tinted).astype(np.uint8))
    if crop_padding is not None and not mask.whole_frame:
        left, top, right, bottom = crop_box(weights > 0, crop_padding)
        ImageDraw.Draw(image).rectangle((left, top, right - 1, bottom - 1), outline=CROP_OUTLINE)
    return image


def enlarged(image: Image.Image, at_least: int = PREVIEW) -> Image.Image:
    """``image`` scaled up by a whole factor (nearest neighbour) so a small frame's pixels can be seen."""
    factor = max(1, at_least // max(image.size))
    return image if factor == 1 else image.resize((image.width * factor, image.height * factor), Image.NEAREST)
