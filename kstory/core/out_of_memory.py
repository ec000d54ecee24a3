"""Recognise running out of memory, on a GPU or on the CPU, so each phase can name its own knobs.

PyTorch raises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``)
when the device allocator gives up, but the CPU allocator raises a plain
``RuntimeError`` ("can't allocate memory"), and some kernels word it as
"out of memory". A phase catches both and turns them into a KstoryError that
says which settings lower its need, instead of a traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kstory.core.errors import KstoryError

_PHRASES = ("out of memory", "can't allocate memory")
# torch.OutOfMemoryError is the public name from torch 2.5; torch.cuda's alias exists on every supported version.
_DEVICE_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def is_out_of_memory(error: BaseException) -> bool:
    """True for the device allocator's OutOfMemoryError and the CPU allocator's RuntimeError."""
    if isinstance(error, _DEVICE_OOM):
        return True
    return isinstance(error, RuntimeError) and any(phrase in str(error).lower() for phrase in _PHRASES)


def first_line(error: BaseException) -> str:
    """The allocator's own sentence (its later lines are tuning advice about PYTORCH_CUDA_ALLOC_CONF)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


@contextlib.contextmanager
def out_of_memory_named(what: str, fix: str) -> Iterator[None]:
    """Inside, running out of memory becomes "ran out of memory ``what``" with ``fix``; other errors pass."""
    try:
        yield
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        raise KstoryError(f"ran out of memory {what}: {first_line(error)}", fix=fix) from error
