"""story stage (see docs/run-directory.md for the files it reads and writes, docs/story.md for the spec).

``load_spec`` is cheap; the names that need torch and DiffSynth load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

import kstory  # noqa: F401  (installs the torchvision import fix before DiffSynth loads)

_LAZY = {
    "load_spec": "story.spec",
    "StorySpec": "story.spec",
    "generate_story": "story.run",
    "StoryResult": "story.run",
    "reroll": "story.reroll_frame",
    "make_demo_spec": "story.demo",
    "build_tiny_controlnets": "story.tiny",
    "load_kolors_controlnet": "story.controlnet_kolors",
    "pose_names": "story.guides.pose_library",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
