"""story stage (see docs/run-directory.md for the files it reads and writes, docs/story.md for the spec).

``load_spec`` is cheap; the names that need torch and DiffSynth load on first use.
"""

from __future__ import annotations

import kstory  # noqa: F401  (installs the torchvision import fix before DiffSynth loads)
from kstory.lazy import lazy_attributes

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


__getattr__ = lazy_attributes(__name__, _LAZY)
