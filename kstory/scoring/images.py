"""Find the images to score and decode them in a worker pool, one bad file never stopping the rest.

Every model sees the same pixels: the file's first frame converted with PIL's
``convert("RGB")``, which is exactly what the organisers' ``CLIPProcessor``
does (grayscale is replicated, palettes are looked up, alpha is dropped, not
composited, EXIF orientation is not applied). Converting any other way would
change the aesthetic score the gate is decided on.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kstory.core.errors import KstoryError
from kstory.core.images import strict_decoding

# What PIL raises for files that are not images, are truncated or are corrupt.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass
class Decoded:
    """One image, hashed and preprocessed for every model that will see it."""

    path: Path
    sha256: str
    size: tuple[int, int]
    mode: str
    inputs: dict[str, Any] = field(repr=False)  # model name -> preprocessed tensor


@dataclass(frozen=True)
class Skipped:
    path: Path
    reason: str


Preprocess = Callable[[Image.Image], Any]


def collect_files(inputs: Iterable[Path | str]) -> list[Path]:
    """Files named directly, plus every file directly inside each folder, like the organisers' loop (sorted)."""
    inputs = [Path(item) for item in inputs]
    files: list[Path] = []
    for item in inputs:
        if item.is_dir():
            files.extend(sorted(p for p in item.iterdir() if p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise KstoryError("no such file or folder", path=item, fix="check the path of the images to score")
    if not files:
        raise KstoryError(
            f"no files to score in {', '.join(map(str, inputs)) or 'the arguments'}",
            fix="point at the folder of generated frames (e.g. runs/NAME/story) or at image files",
        )
    return files


def decode(path: Path, preprocess: dict[str, Preprocess]) -> Decoded | Skipped:
    """Read, hash, convert and preprocess one file; a file PIL cannot read becomes a ``Skipped``."""
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            mode, size = image.mode, image.size
            rgb = image.convert("RGB")  # forces the full decode: truncation shows up here
    except UnidentifiedImageError:
        return Skipped(path, "not an image PIL can read")
    except DECODE_ERRORS as exc:
        return Skipped(path, f"unreadable image ({type(exc).__name__}: {exc})")
    return Decoded(path, hashlib.sha256(data).hexdigest(), size, mode, {name: fn(rgb) for name, fn in preprocess.items()})


def decode_all(
    files: list[Path], preprocess: dict[str, Preprocess], *, workers: int | None = None, window: int = 32
) -> Iterator[Decoded | Skipped]:
    """Decode ``files`` in order on a thread pool, keeping at most ``window`` in flight.

    PIL and NumPy release the GIL while decoding and resizing, so threads run
    beside the model's forward pass instead of waiting for it.
    """
    workers = workers or min(4, os.cpu_count() or 1)
    with strict_decoding(), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kstory-decode") as pool:
        pending: deque[Future[Decoded | Skipped]] = deque()
        queue = iter(files)
        for path in queue:
            pending.append(pool.submit(decode, path, preprocess))
            if len(pending) >= window:
                break
        while pending:
            yield pending.popleft().result()
            for path in queue:
                pending.append(pool.submit(decode, path, preprocess))
                break
