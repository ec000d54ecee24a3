"""Optional DreamSim distances between frames, a closer match to human "same style" judgements than CLIP-I.

DreamSim is not a dependency: it is used only when asked for and installed,
and its weights download on first use (``pip install dreamsim``).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.scoring.report import ModelInfo


@dataclass
class DreamSim:
    model: Any
    preprocess: Any  # PIL image -> [1, 3, H, W]
    info: ModelInfo

    def prepare(self, image) -> torch.Tensor:
        return self.preprocess(image)[0]

    @torch.inference_mode()
    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.embed(pixels)


def load_dreamsim(*, device: torch.device, cache_dir: Path) -> DreamSim:
    if importlib.util.find_spec("dreamsim") is None:
        raise KstoryError("DreamSim was asked for but is not installed", fix="pip install dreamsim, or leave DreamSim off")
    from dreamsim import dreamsim

    model, preprocess = dreamsim(pretrained=True, device=str(device), cache_dir=str(cache_dir / "dreamsim"))
    return DreamSim(model.eval(), preprocess, ModelInfo(role="dreamsim", form="dreamsim", identity="dreamsim:ensemble"))
