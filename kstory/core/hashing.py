"""Content hashes: the identity of weights, frames, datasets and packages in manifests, reports and stamps.

Nothing here hashes a place or a time: a file moved or copied (``cp -a``,
``shutil.copytree``, a new mtime) keeps its hash. Only the per-process cache
of :func:`sha256_file_cached` looks at size and mtime, to know when a file
must be read again.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

PAGE_BYTES = 64 << 10  # 64 KiB
PAGES = 64
SAFETENSORS_HEADER_LIMIT = 100 << 20  # a header above this is not safetensors (the format's own limit)
WEIGHTS_DIGEST_VERSION = "sampled-v2"

_cache: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks so multi-GB weights do not fill memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_file_cached(path: str | Path) -> str:
    """sha256 of a file, read again only when its size or mtime changed since this process last read it."""
    path = Path(path)
    info = path.stat()
    key = (str(path.resolve()), info.st_size, info.st_mtime_ns)
    if key not in _cache:
        _cache[key] = sha256_file(path)
    return _cache[key]


def page_offsets(size: int, pages: int = PAGES, page: int = PAGE_BYTES) -> list[int]:
    """``pages`` deterministic offsets spread evenly from the first to the last page of a file."""
    if size <= pages * page:
        return [0]
    last = size - page
    return [round(i * last / (pages - 1)) for i in range(pages)]


def _safetensors_header(handle, size: int) -> bytes:
    """The length prefix and JSON header of a safetensors file (names, dtypes, shapes, offsets), else b""."""
    if size < 8:
        return b""
    prefix = handle.read(8)
    (length,) = struct.unpack("<Q", prefix)
    if length > min(SAFETENSORS_HEADER_LIMIT, size - 8):
        return b""
    return prefix + handle.read(length)


def sampled_digest(path: str | Path) -> str:
    """A cheap content hash of a weights file: size, the safetensors header, and 64 pages of 64 KiB.

    The pages sit at fixed offsets spread over the whole file, so a fine-tune
    (which changes every tensor) changes the hash even when its size, header,
    and first and last MiB match the original; a 17 GB file costs 4 MiB of
    reads (docs/performance.md). Files up to 4 MiB are hashed whole.
    """
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(f"{WEIGHTS_DIGEST_VERSION}\0{size}\0".encode())
    with open(path, "rb") as handle:
        offsets = page_offsets(size)
        if offsets == [0]:
            digest.update(handle.read())
            return digest.hexdigest()
        if path.suffix == ".safetensors":
            digest.update(_safetensors_header(handle, size))
        for offset in offsets:
            handle.seek(offset)
            digest.update(handle.read(PAGE_BYTES))
    return digest.hexdigest()


def folder_digest(folder: str | Path, *, sampled: bool = False) -> str:
    """Hash of a folder's content: each file's path relative to the folder and its content hash.

    ``sampled`` uses :func:`sampled_digest` (weights folders); otherwise every
    byte is read, once per process for an unchanged file. Hidden files and
    folders (``.git``, ``.cache``) are left out.
    """
    folder = Path(folder)
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            path = Path(root) / name
            content = sampled_digest(path) if sampled else sha256_file_cached(path)
            digest.update(f"{path.relative_to(folder).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def path_digest(path: str | Path, *, sampled: bool = False) -> str:
    """Content hash of a file or a folder (names relative to it); ``missing`` when there is nothing."""
    path = Path(path)
    if path.is_dir():
        return "dir:" + folder_digest(path, sampled=sampled)
    if path.is_file():
        return "file:" + (sampled_digest(path) if sampled else sha256_file_cached(path))
    return "missing"
