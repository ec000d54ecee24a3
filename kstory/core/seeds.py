"""One range for every seed a user can write, so a bad one fails at validation, not minutes into a run.

[0, 2**63) fits a signed 64-bit integer: torch generators, numpy and every
JSON reader of the manifest take it as is.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

SEED_LIMIT = 2**63
Seed = Annotated[int, Field(ge=0, lt=SEED_LIMIT)]


def check_seed(value: int) -> int:
    """``value`` if it is a valid seed, else ValueError saying the range."""
    if not 0 <= value < SEED_LIMIT:
        raise ValueError(f"seed {value} is out of range: use 0 to 2**63-1 ({SEED_LIMIT - 1})")
    return value
