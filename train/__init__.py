"""train stage: a Kolors LoRA from the prep stage's dataset (see docs/train.md).

``train_lora`` and ``load_lora_into_pipeline`` need torch, DiffSynth and
Lightning (seconds to import), so they load on first use; ``TrainSettings``
is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

import kstory  # noqa: F401  (installs the torchvision import fix before Lightning/DiffSynth load)
from train.settings import TrainSettings, ValidationPrompt

_LAZY = {
    "train_lora": "train.trainer",
    "TrainResult": "train.trainer",
    "load_lora_into_pipeline": "train.lora_io",
    "read_lora": "train.lora_io",
}

__all__ = ["TrainSettings", "ValidationPrompt", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
