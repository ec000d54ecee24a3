"""Character reference pictures uploaded on the dashboard, kept in ``RUN/references/``.

An upload is stored as it came, atomically, under its own (cleaned) name; a
different picture of the same name gets a new name (``fox-2.png``), so a
stored reference, which a spec may still name, is never overwritten. The same
bytes again reuse the stored file. The spec names the file relative to itself
(kstory.story.reference_edit), and the story stage copies it into the story.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

from PIL import Image

from kstory.core import atomic
from kstory.core.errors import KstoryError

FOLDER = "references"
SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def folder(run_root: Path) -> Path:
    return Path(run_root) / FOLDER


def stored(run_root: Path) -> list[Path]:
    """The pictures in ``RUN/references/``, by name."""
    where = folder(run_root)
    if not where.is_dir():
        return []
    return sorted(p for p in where.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES
                  and not p.name.startswith("."))


def _clean_name(name: str) -> tuple[str, str]:
    path = Path(Path(name).name)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise KstoryError(f"{name!r} is not a picture kstory takes as a reference",
                          fix=f"upload a {', '.join(s.lstrip('.') for s in SUFFIXES)} file")
    stem = _UNSAFE.sub("-", path.stem).strip("-") or "reference"
    return stem[:64], suffix


def store(run_root: Path, name: str, data: bytes) -> Path:
    """Keep the uploaded picture ``data`` (file name ``name``) in ``RUN/references/``; returns where it is.

    It must decode as a picture (the upload is refused otherwise). A stored file with the same bytes is
    reused; one with other bytes keeps its name and the upload gets the next free ``<stem>-N`` name.
    """
    stem, suffix = _clean_name(name)
    target = folder(run_root) / f"{stem}{suffix}"
    for n in range(2, 10_000):
        if not target.exists():
            break
        if target.is_file() and target.read_bytes() == data:
            return target
        target = target.with_name(f"{stem}-{n}{suffix}")
    else:
        raise KstoryError(f"too many stored references named {stem}", path=folder(run_root),
                          fix="rename the picture before uploading it, or tidy the folder")
    try:  # decoded before it is kept, as the story stage reads it: a broken upload never becomes a file
        with Image.open(io.BytesIO(data)) as handle:
            handle.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a broken file
        raise KstoryError(f"the upload {name!r} is not a readable picture ({error})",
                          fix="upload a PNG, JPEG or WebP picture") from None
    atomic.write_bytes(target, data)
    return target
