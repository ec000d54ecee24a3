"""Inpainting masks: read and check one, feather its edge, find the crop around it.

White (255) marks what is repainted, black (0) what is kept. A mask of
another size is resized to the frame (nearest neighbour, with a warning); a
non-binary one is thresholded and the threshold recorded; an empty one is an
error; one covering the whole frame turns the inpaint into a full re-roll of
the frame, and the log says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger

log = get_logger("story")
DEFAULT_THRESHOLD = 128  # a grey value >= this counts as "repaint"


@dataclass(frozen=True)
class Mask:
    """A binary mask at frame size (bool array, True: repaint) and what was done to make it binary."""

    pixels: np.ndarray
    threshold: int | None  # set when the file held values other than 0 and 255
    resized_from: tuple[int, int] | None  # (width, height) of the file when it was not the frame's size

    @property
    def whole_frame(self) -> bool:
        return bool(self.pixels.all())

    def image(self) -> Image.Image:
        """The binary mask as an 8-bit picture (what is stored beside the story and shipped)."""
        return Image.fromarray(np.where(self.pixels, 255, 0).astype(np.uint8), mode="L")


def read_mask(path: Path, size: tuple[int, int], threshold: int = DEFAULT_THRESHOLD) -> Mask:
    """The mask file at ``path`` made binary at frame ``size`` (width, height); see the module docstring."""
    path = Path(path)
    try:
        with Image.open(path) as handle:
            grey = handle.convert("L") if "A" not in handle.getbands() else _alpha_or_grey(handle)
    except (OSError, ValueError) as error:
        raise KstoryError(f"cannot read the mask ({error})", path=path,
                          fix="give a PNG (or other picture): white where the frame is repainted, black elsewhere") from error
    resized = None
    if grey.size != tuple(size):
        resized = grey.size
        log.warning("mask %s is %dx%d, the frame %dx%d: resized to the frame", path.name, *grey.size, *size)
        grey = grey.resize(tuple(size), Image.NEAREST)
    values = np.asarray(grey)
    binary = bool(np.isin(values, (0, 255)).all())
    if not binary:
        log.warning("mask %s is not black and white: grey values >= %d count as repainted", path.name, threshold)
    pixels = values >= threshold
    if not pixels.any():
        raise KstoryError("the mask is empty: nothing would be repainted", path=path,
                          fix="paint the region to repaint white (or use `kstory reroll --strength` for the whole frame)")
    mask = Mask(pixels, None if binary else threshold, resized)
    if mask.whole_frame:
        log.warning("mask %s covers the whole frame: this is a full re-roll of the frame at the given strength", path.name)
    return mask


def _alpha_or_grey(image: Image.Image) -> Image.Image:
    """A mask with transparency: painted (opaque) pixels are the region, as drawing tools save them."""
    alpha = image.getchannel("A")
    return alpha if alpha.getextrema() != (255, 255) else image.convert("L")


def feathered(pixels: np.ndarray, feather: int) -> np.ndarray:
    """Blend weights in [0, 1]: 1 on the mask, falling linearly to 0 over ``feather`` pixels outside it.

    Beyond ``feather`` pixels from the mask the weight is exactly 0, so those pixels stay the original's.
    """
    inside = pixels.astype(np.float32)
    if feather <= 0:
        return inside
    import cv2

    distance = cv2.distanceTransform((~pixels).astype(np.uint8), cv2.DIST_L2, 5)
    return np.clip(1.0 - distance / float(feather + 1), 0.0, 1.0).astype(np.float32)


def crop_box(pixels: np.ndarray, padding: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) around the mask plus ``padding``, grown to the frame's aspect ratio and kept
    inside the frame (diffusers' ``padding_mask_crop`` rule), on the 8-pixel latent grid."""
    height, width = pixels.shape
    rows, cols = np.nonzero(pixels)
    left, right = max(int(cols.min()) - padding, 0), min(int(cols.max()) + 1 + padding, width)
    top, bottom = max(int(rows.min()) - padding, 0), min(int(rows.max()) + 1 + padding, height)
    box_w, box_h = right - left, bottom - top
    ratio = width / height
    if box_w / box_h < ratio:  # too narrow: widen
        box_w = min(width, int(round(box_h * ratio)))
    else:
        box_h = min(height, int(round(box_w / ratio)))
    box_w, box_h = min(width, -(-box_w // 8) * 8), min(height, -(-box_h // 8) * 8)
    centre_x, centre_y = (left + right) // 2, (top + bottom) // 2
    left = min(max(centre_x - box_w // 2, 0), width - box_w)
    top = min(max(centre_y - box_h // 2, 0), height - box_h)
    return left, top, left + box_w, top + box_h


def latent_region(weights: np.ndarray) -> np.ndarray:
    """(H/8, W/8) array: 1 for each latent cell touching the blended region (repainted), 0 where the source stays."""
    height, width = weights.shape
    cells = weights.reshape(height // 8, 8, width // 8, 8)
    return (cells.max(axis=(1, 3)) > 0).astype(np.float32)
