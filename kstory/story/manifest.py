"""manifest.json: everything needed to regenerate each frame, and the history of every re-roll.

Schema ``kstory-story/1`` is documented in docs/story.md. Frames are keyed
by their 1-based number as a string ("1".."8") so a partial run or a re-roll
rewrites one entry and keeps the others verbatim.
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from PIL import Image

from kstory.core.atomic import write_bytes, write_json
from kstory.core.errors import KstoryError

FORMAT = "kstory-story/1"
MANIFEST = "manifest.json"
_PACKAGES = ("kstory", "torch", "diffsynth", "transformers", "safetensors", "numpy", "pillow", "opencv-python-headless")


def frame_name(index: int) -> str:
    return f"{index:02d}"


def png_bytes(image: Image.Image) -> bytes:
    """PNG encoding without timestamps or text chunks, so equal pixels give equal files and hashes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def save_png(image: Image.Image, path: Path) -> str:
    """Write ``image`` atomically; returns the file's sha256."""
    data = png_bytes(image)
    write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def read_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The story's manifest, None when there is none yet; KstoryError for a foreign or broken one."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise KstoryError(f"unreadable manifest ({error})", path=path,
                          fix="delete the story folder and generate it again") from error
    if manifest.get("format") != FORMAT:
        raise KstoryError(f"not a {FORMAT} manifest (format: {manifest.get('format')})", path=path,
                          fix="use a folder written by `kstory story`")
    return manifest


def existing_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of a story that must exist already (a re-roll, a repair, a pick)."""
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise KstoryError("no manifest.json: this folder has no generated story", path=out_dir,
                          fix="run `kstory story` first")
    return manifest


def manifest_frame(manifest: dict[str, Any], frame: int, out_dir: Path) -> dict[str, Any]:
    """Frame ``frame``'s manifest entry, or an error listing the frames there are."""
    records = manifest["frames"]
    if str(frame) not in records:
        raise KstoryError(f"frame {frame} is not in this story (frames: {', '.join(records)})", path=out_dir,
                          fix="pick one of the listed frames")
    return records[str(frame)]


def write_manifest(out_dir: Path, manifest: dict[str, Any]) -> Path:
    return write_json(Path(out_dir) / MANIFEST, manifest)
