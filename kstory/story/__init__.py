"""story stage (see docs/run-directory.md for the files it reads and writes, docs/story.md for the spec).

``load_spec`` is cheap; the names that need torch and DiffSynth load on first use.
"""

from __future__ import annotations

import kstory  # noqa: F401  (installs the torchvision import fix before DiffSynth loads)
from kstory.core.lazy import lazy_attributes

_LAZY = {
    "load_spec": "kstory.story.spec",
    "StorySpec": "kstory.story.spec",
    "generate_story": "kstory.story.run",
    "StoryResult": "kstory.story.run",
    "reroll": "kstory.story.reroll_frame",
    "make_demo_spec": "kstory.story.demo",
    "build_tiny_controlnets": "kstory.story.tiny",
    "load_kolors_controlnet": "kstory.story.controlnet_kolors",
    "pose_names": "kstory.story.guides.pose_library",
}

__all__ = list(_LAZY)


__getattr__ = lazy_attributes(__name__, _LAZY)
