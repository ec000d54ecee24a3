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


def candidate_seeds(seed: int, count: int) -> list[int]:
    """The first ``count`` candidate seeds of a frame whose spec seed is ``seed``.

    Candidate 0 is ``seed`` itself (one candidate is the plain story); the others are hashed from
    (seed, k), so the list depends only on the spec, and a longer list starts with a shorter one:
    raising the number of candidates only adds seeds.
    """
    import hashlib

    check_seed(seed)
    seeds = [seed]
    for k in range(1, max(count, 0)):
        digest = hashlib.sha256(f"kstory-candidate/{seed}/{k}".encode()).digest()
        seeds.append(int.from_bytes(digest[:8], "little") % SEED_LIMIT)
    return seeds[: max(count, 0)]
