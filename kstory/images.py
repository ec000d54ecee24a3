"""Image decoding rules shared by every stage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
