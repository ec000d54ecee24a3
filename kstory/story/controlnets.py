"""Find, identify and load the ControlNets a story names, and run them inside DiffSynth's UNet loop.

A name maps to weights: a diffusers folder (Kwai-Kolors ControlNet) or a
Union safetensors file. ``GuidedControl`` is what ``lets_dance_xl`` calls in
place of DiffSynth's ``MultiControlNetManager``: same call, but every frame
of a batch has its own guide, scale and start/end window.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.story.controlnet_kolors import WEIGHTS_NAME, load_kolors_controlnet
from kstory.story.controlnet_union import TASKS, is_union_file, load_union_controlnet

_FIX = (
    "pass a Kwai-Kolors ControlNet folder (config.json + diffusion_pytorch_model.safetensors) or an SDXL "
    "ControlNet-Union(-promax) .safetensors file"
)


@dataclass(frozen=True)
class ControlNetWeights:
    name: str
    path: Path
    kind: str  # "kolors" (diffusers ControlNetModel folder) or "union" (DiffSynth SDXLControlNetUnion)
    sha256: str


def identify(name: str, path: Path) -> ControlNetWeights:
    """Which kind of ControlNet ``path`` holds; anything else is an unknown layout."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        config = path / "config.json"
        try:
            class_name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError):
            class_name = None
        if class_name == "ControlNetModel" and (path / WEIGHTS_NAME).is_file():
            digest = sha256_file(path / WEIGHTS_NAME) + sha256_file(config)
            return ControlNetWeights(name, path, "kolors", hashlib.sha256(digest.encode()).hexdigest())
        raise KstoryError(f"ControlNet {name!r}: unknown layout (no diffusers ControlNetModel config.json + weights)",
                          path=path, fix=_FIX)
    if not path.is_file():
        raise KstoryError(f"ControlNet {name!r} not found", path=path, fix=_FIX)
    if is_union_file(path):
        return ControlNetWeights(name, path, "union", sha256_file(path))
    raise KstoryError(f"ControlNet {name!r}: unknown layout (not a ControlNet-Union safetensors file)", path=path, fix=_FIX)


def load(weights: ControlNetWeights, device: str, torch_dtype: torch.dtype) -> torch.nn.Module:
    if weights.kind == "kolors":
        return load_kolors_controlnet(weights.path, device, torch_dtype)
    return load_union_controlnet(weights.path, device, torch_dtype)


@dataclass
class ControlUnit:
    """One ControlNet applied to a batch: per-frame guide images, scales and windows (0 scale = frame unguided)."""

    model: torch.nn.Module
    task: str | None  # DiffSynth processor id for Union models, None for Kolors ones
    images: torch.Tensor  # (frames, 3, H, W) in [0, 1]
    scales: list[float]
    starts: list[float]
    ends: list[float]

    def step_scales(self, step: int, steps: int) -> list[float]:
        """Per-frame scale at ``step``: off before ``start`` and after ``end`` (diffusers' rule)."""
        return [
            0.0 if step / steps < start or (step + 1) / steps > end else scale
            for scale, start, end in zip(self.scales, self.starts, self.ends)
        ]


class GuidedControl:
    """The ``controlnet`` argument of ``lets_dance_xl`` for one denoising step of one batch.

    The batch holds the frames twice (positive, then negative prompt), so
    images and scales are repeated to match. Units with no active frame at
    this step are skipped, so a scale of 0 adds nothing, exactly.
    """

    def __init__(self, units: list[ControlUnit], step: int, steps: int, copies: int):
        self.active = []
        for unit in units:
            scales = unit.step_scales(step, steps)
            if any(scale != 0.0 for scale in scales):
                self.active.append((unit, torch.tensor(scales * copies).view(-1, 1, 1, 1), copies))

    def __bool__(self) -> bool:
        return bool(self.active)

    def frames(self) -> torch.Tensor:
        """The ``controlnet_frames`` tensor lets_dance_xl slices: (units, batch, 3, H, W)."""
        return torch.stack([unit.images.repeat(copies, 1, 1, 1) for unit, _, copies in self.active])

    def __call__(self, sample, timestep, encoder_hidden_states, conditionings, **kwargs) -> list[torch.Tensor]:
        sample = sample[:, :4]  # an inpainting UNet's extra channels (mask, masked picture) are not the ControlNet's
        total = None
        for (unit, scales, _), conditioning in zip(self.active, conditionings):
            extra = {"processor_id": unit.task} if unit.task is not None else {}
            residuals = unit.model(sample, timestep, encoder_hidden_states, conditioning, **kwargs, **extra)
            scales = scales.to(device=sample.device, dtype=sample.dtype)
            residuals = [res * scales for res in residuals]
            total = residuals if total is None else [a + b for a, b in zip(total, residuals)]
        return total


def union_task(task: str | None, name: str) -> str:
    """DiffSynth's processor id for a guide showing ``task`` (pose, canny or depth)."""
    if task not in TASKS:
        raise KstoryError(
            f"guide for Union ControlNet {name!r} does not say what it shows",
            fix="add task: pose, canny or depth to that image guide",
        )
    return TASKS[task]
