"""The built-in pose library (kstory/story/poses/library.json), addressed by name from a story spec."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

LIBRARY = Path(__file__).resolve().parent.parent / "poses" / "library.json"
# COCO-18 indices of each left/right pair, swapped when a pose is mirrored.
_MIRROR_PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))

Point = tuple[float, float] | None


@lru_cache(maxsize=1)
def _library() -> dict[str, list[Point]]:
    data = json.loads(LIBRARY.read_text(encoding="utf-8"))
    return {name: [tuple(p) if p is not None else None for p in points] for name, points in data["poses"].items()}


def pose_names() -> list[str]:
    """Names a spec may use in ``pose:``."""
    return sorted(_library())


def library_pose(name: str, flip: bool = False) -> list[Point]:
    """The 18 body points of ``name`` as frame fractions; ``flip`` mirrors the figure left-right."""
    points = list(_library()[name])
    if flip:
        points = [(1.0 - p[0], p[1]) if p is not None else None for p in points]
        for right, left in _MIRROR_PAIRS:
            points[right], points[left] = points[left], points[right]
    return points
