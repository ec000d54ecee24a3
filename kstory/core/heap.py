"""Hand the C heap's free pages back to the system (glibc's ``malloc_trim``), where the C library has it.

Loading that frees many short-lived tensors between long-lived ones (a
weight read, converted, quantised and dropped, beside the int8 result that
stays) leaves free holes inside glibc's heap that it keeps resident: the
process's footprint grows as if nothing had been freed. ``malloc_trim``
returns those pages; elsewhere (macOS, musl) this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache


@cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def trim_heap() -> bool:
    """Return the heap's free pages to the system; False where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
