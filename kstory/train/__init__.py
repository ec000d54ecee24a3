"""train stage: a Kolors LoRA from the prep stage's dataset (see docs/train.md).

``train_lora`` and ``load_lora_into_pipeline`` need torch, DiffSynth and
Lightning (seconds to import), so they load on first use; ``TrainSettings``
is cheap.
"""

from __future__ import annotations

import kstory  # noqa: F401  (installs the torchvision import fix before Lightning/DiffSynth load)
from kstory.core.lazy import lazy_attributes
from kstory.core.train_settings import TrainSettings, ValidationPrompt

_LAZY = {
    "train_lora": "kstory.train.trainer",
    "TrainResult": "kstory.train.trainer",
    "load_lora_into_pipeline": "kstory.train.lora_io",
    "read_lora": "kstory.train.lora_io",
}

__all__ = ["TrainSettings", "ValidationPrompt", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)
