"""Recognise running out of memory, on a GPU or on the CPU, so each stage can name its own knobs.

PyTorch raises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``)
when the device allocator gives up, but the CPU allocator raises a plain
``RuntimeError`` ("can't allocate memory"), and some kernels word it as
"out of memory". A stage catches both and turns them into a KstoryError that
says which settings lower the need, instead of a traceback.
"""

from __future__ import annotations

import torch

_PHRASES = ("out of memory", "can't allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """True for the device allocator's OutOfMemoryError and the CPU allocator's RuntimeError."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and any(phrase in str(error).lower() for phrase in _PHRASES)


def first_line(error: BaseException) -> str:
    """The allocator's own sentence (its later lines are tuning advice about PYTORCH_CUDA_ALLOC_CONF)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
