"""Small display helpers shared by the pages: safe thumbnails, error messages, the page context."""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import streamlit as st
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger

log = get_logger("app")
THUMB = 256
MAX_PREVIEW_BYTES = 20_000_000


@dataclass
class Context:
    """What every page gets: the runs root and the chosen run (None before one is picked)."""

    runs_root: Path
    run: Path | None


def thumbnail(path: Path | None, size: int = THUMB) -> Image.Image | None:
    """A small RGB copy of the image at ``path``, or None if it is missing, huge or unreadable."""
    if path is None:
        return None
    try:
        if not path.is_file() or path.stat().st_size > MAX_PREVIEW_BYTES:
            return None
        with Image.open(path) as handle:
            if handle.width * handle.height > 64_000_000:
                return None
            image = handle.convert("RGB")
        image.thumbnail((size, size))
        return image
    except Exception:  # noqa: BLE001 - any unreadable picture is just "no preview"
        return None


def show_image(path: Path | None, caption: str | None = None, size: int = THUMB) -> None:
    """The image at ``path`` as a thumbnail, or a note that it cannot be shown."""
    image = thumbnail(path, size)
    if image is None:
        st.caption(f"(no preview: {path.name if path else 'no file'} is missing or unreadable)")
        if caption:
            st.caption(caption)
    else:
        st.image(image, caption=caption)


def show_error(error: BaseException) -> None:
    """A KstoryError as its message and fix; anything else as one line (the traceback goes to the log only)."""
    if isinstance(error, KstoryError):
        st.error(error.render())
    else:
        log.error("app action failed: %s", "".join(traceback.format_exception(error)))
        st.error(f"unexpected error: {type(error).__name__}: {error}")


@contextmanager
def guarded() -> Iterator[None]:
    """Run a block; show any error as a message on the page instead of a traceback."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - shown to the user
        show_error(error)
