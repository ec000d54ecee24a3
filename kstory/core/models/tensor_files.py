"""Read a weights file tensor by tensor, converted as it is read, never holding the whole file mapped.

safetensors memory-maps the file, and every page a read touches stays resident
until the handle closes: reading a 5 GB UNet through one handle peaks at the
file *plus* its converted copy (10 GB). Reopening the file every few hundred
megabytes bounds the mapped share to one window, so the peak is the converted
tensors plus one window.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

WINDOW_BYTES = 256 * 2**20  # the most of the file mapped at once

_ITEM_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


def read_tensors(path: Path | str, dtype: torch.dtype | None = None,
                 window_bytes: int = WINDOW_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` (cast to ``dtype`` when given), read one window of the file at a time.

    ``.safetensors`` files are read in windows; other files (``.bin``, ``.pt``)
    go through DiffSynth's reader, which loads them with ``weights_only=True``.
    """
    path = str(path)
    if not path.endswith(".safetensors"):
        from diffsynth.models.utils import load_state_dict

        return load_state_dict(path, torch_dtype=dtype)
    return dict(iter_tensors(path, dtype, window_bytes))


def iter_tensors(path: Path | str, dtype: torch.dtype | None = None,
                 window_bytes: int = WINDOW_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)`` of a ``.safetensors`` file, one by one, cast as read, one window mapped at a time.

    For a caller that shrinks each tensor as it arrives (int8 quantisation), so
    the whole converted file never exists at once either.
    """
    with safe_open(str(path), framework="pt") as handle:
        sizes = {key: _stored_bytes(handle.get_slice(key)) for key in handle.keys()}
    for window in _windows(sizes, window_bytes):
        with safe_open(str(path), framework="pt") as handle:
            for key in window:
                tensor = handle.get_tensor(key)
                if dtype is not None:
                    tensor = tensor.to(dtype)  # the stored copy is dropped before the caller gets this one
                yield key, tensor
                del tensor


def tensor_shapes(path: Path | str) -> dict[str, tuple[int, ...]]:
    """Each key's shape from a ``.safetensors`` header, without reading any tensor data."""
    with safe_open(str(path), framework="pt") as handle:
        return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}


def _stored_bytes(view: object) -> int:
    count = 1
    for extent in view.get_shape():  # type: ignore[attr-defined]
        count *= extent
    return count * _ITEM_BYTES.get(view.get_dtype(), 1)  # type: ignore[attr-defined]


def _windows(sizes: dict[str, int], window_bytes: int) -> Iterator[list[str]]:
    """Runs of keys whose stored bytes add up to about ``window_bytes`` (a bigger tensor is a window alone)."""
    window: list[str] = []
    filled = 0
    for key, size in sizes.items():
        if window and filled + size > window_bytes:
            yield window
            window, filled = [], 0
        window.append(key)
        filled += size
    if window:
        yield window
