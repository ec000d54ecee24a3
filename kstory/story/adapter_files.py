"""Image-adapter folders on disk (IP-Adapter-Plus, FaceID-Plus): find the weight file and its CLIP folder, hash both,
and read the weights safely.

Both published Kolors adapters ship the same way: one weight file (an fp16
pickle, or its flat safetensors form with ``image_proj.*`` / ``ip_adapter.*``
keys) beside a CLIP vision folder. What differs (file names, folder name, the
words of the errors) is passed in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.core.hashing import folder_digest, sha256_file

PICKLE_FIX = "convert it to .safetensors (image_proj.* / ip_adapter.* keys), or use the published file"


@dataclass(frozen=True)
class AdapterFiles:
    """Where an adapter's weight names live (``names``, then a lone weight file) and what to call it in errors."""

    kind: str  # the manifest's name for it, e.g. kolors-ip-adapter-plus
    what: str  # e.g. "IP-Adapter"
    names: tuple[str, ...]
    encoder_dir: str
    fix: str
    lone_file: bool = False  # a folder with exactly one .bin/.safetensors file counts as the weight file


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter on disk: its weight file, its image encoder folder and a content hash of both."""

    kind: str
    path: Path  # as given: the folder (or the weight file)
    adapter: Path
    encoder: Path
    sha256: str

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": str(self.path), "file": self.adapter.name, "sha256": self.sha256}


def find_adapter(path: Path, files: AdapterFiles) -> AdapterWeights:
    """The weight file and encoder folder in ``path`` (a folder, or the weight file beside the folder)."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        adapter = next((path / name for name in files.names if (path / name).is_file()), None)
        if adapter is None and files.lone_file:
            found = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".safetensors"))
            adapter = path / found[0] if len(found) == 1 else None
        if adapter is None:
            raise KstoryError(f"no {files.what} weight file ({' or '.join(files.names)}) in the folder", path=path,
                              fix=files.fix)
    elif path.is_file():
        adapter = path
    else:
        raise KstoryError(f"{files.what} not found", path=path, fix=files.fix)
    encoder = adapter.parent / files.encoder_dir
    if not encoder.is_dir():
        raise KstoryError(f"the {files.what} has no {files.encoder_dir}/ folder beside {adapter.name}",
                          path=adapter.parent, fix=files.fix)
    digest = hashlib.sha256(f"{sha256_file(adapter)}\0{folder_digest(encoder)}".encode()).hexdigest()
    return AdapterWeights(files.kind, path, adapter, encoder, digest)


def load_pickle(path: Path) -> dict[str, Any]:
    """A pickle read only with ``weights_only=True`` (tensors and plain containers); anything else is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError for forbidden globals, RuntimeError for broken archives
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise KstoryError(f"refusing a pickle that does not load with weights_only=True ({reason})", path=path,
                          fix=PICKLE_FIX) from error


def read_weights(path: Path, files: AdapterFiles) -> Any:
    """The weight file as a nested dictionary: the pickle, or the flat safetensors keys split at the first dot."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return load_pickle(path)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise KstoryError(f"unreadable {files.what} file ({error})", path=path, fix=files.fix) from error
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        part, _, name = key.partition(".")
        state.setdefault(part, {})[name] = value
    return state
