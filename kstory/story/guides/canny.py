"""Canny edge guides from a reference image, with OpenCV."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image


def canny_edges(image: Image.Image, low_threshold: int = 100, high_threshold: int = 200) -> Image.Image:
    """White edges on black, three channels (what Canny ControlNets were trained on)."""
    grey = cv2.cvtColor(np.asarray(image.convert("RGB")), cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(grey, low_threshold, high_threshold)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))
