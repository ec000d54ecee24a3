"""Proof that the exported LoRA files do in diffusers what the kstory LoRA does in DiffSynth.

:func:`export_parity` loads the tiny Kolors UNet twice from the same diffusers
weight file: as DiffSynth's ``SDXLUNet`` (the LoRA merged by kstory's own
loader, strength alpha/rank) and as diffusers' ``UNet2DConditionModel`` with
the Kolors settings (``text_proj`` / ``text_time``), inside a diffusers
``KolorsPipeline`` whose ``load_lora_weights`` reads the exported file. Both
UNets then run on the same random inputs. Needs ``diffusers`` (a test
dependency) and the tiny model; the real Kolors UNet works the same way but
takes ~10 GB of memory per copy.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kstory.core.models import KolorsWeights


def tiny_diffusers_unet_config(spec: Any) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config with the tiny model's widths and Kolors' conditioning."""
    from kstory.core.models.unet_config import diffusers_unet_config

    return diffusers_unet_config(spec)


def load_tiny_diffusers_unet(weights: KolorsWeights) -> torch.nn.Module:
    """The tiny UNet file loaded strictly into diffusers' ``UNet2DConditionModel``."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    from kstory.core.models.tiny import TinyKolorsSpec, read_tiny_manifest

    spec = TinyKolorsSpec.from_json(read_tiny_manifest(weights.root)["spec"])
    unet = UNet2DConditionModel(**tiny_diffusers_unet_config(spec))
    unet.load_state_dict(load_file(str(weights.unet)), strict=True)
    return unet.eval()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class ParityResult:
    max_abs_diff: dict[str, float]  # format -> max |diffusers - DiffSynth| of the UNet output
    lora_effect: float  # max |DiffSynth with LoRA - without|: the comparison is not vacuous
    base_diff: float  # max |diffusers - DiffSynth| without any LoRA
    warnings: dict[str, list[str]] = field(default_factory=dict)  # diffusers warnings while loading each file
    injected: dict[str, int] = field(default_factory=dict)  # LoRA layers diffusers created per format
    modules: int = 0  # LoRA modules in the kstory file


def _inputs(spec: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(2, 4, 16, 16, generator=g),
        "timestep": torch.tensor([500.0, 250.0]),
        "text": torch.randn(2, 7, spec.text_hidden_size, generator=g),
        "pooled": torch.randn(2, spec.text_hidden_size, generator=g),
        "time_ids": torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2),
    }


@torch.no_grad()
def _run_diffsynth(unet: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    return unet(x["sample"], x["timestep"], x["text"], x["time_ids"], x["pooled"])


@torch.no_grad()
def _run_diffusers(unet: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    added = {"text_embeds": x["pooled"], "time_ids": x["time_ids"]}
    return unet(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=added).sample


def _diffusers_with_lora(weights: KolorsWeights, path: Path, fmt: str, result: ParityResult) -> torch.Tensor:
    from diffusers import KolorsPipeline
    from peft.tuners.lora import LoraLayer

    unet = load_tiny_diffusers_unet(weights)
    pipe = KolorsPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=None)
    capture = _Capture()
    loggers = [logging.getLogger(name) for name in ("diffusers", "peft")]
    for logger in loggers:
        logger.addHandler(capture)
    try:
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=fmt)
    finally:
        for logger in loggers:
            logger.removeHandler(capture)
    result.warnings[fmt] = capture.messages
    result.injected[fmt] = sum(1 for m in unet.modules() if isinstance(m, LoraLayer))
    return unet


def export_parity(lora_path: Path, exports: dict[str, Path], weights: KolorsWeights) -> ParityResult:
    """UNet output differences between DiffSynth (kstory LoRA merged) and diffusers (each export loaded)."""
    from kstory.core.models.tiny import TinyKolorsSpec, load_tiny_models, read_tiny_manifest
    from kstory.core.lora import load_lora_into_pipeline, read_lora

    spec = TinyKolorsSpec.from_json(read_tiny_manifest(weights.root)["spec"])
    x = _inputs(spec)
    base_ds = load_tiny_models(weights)["sdxl_unet"]
    before = _run_diffsynth(base_ds, x)
    base_diff = float((_run_diffusers(load_tiny_diffusers_unet(weights), x) - before).abs().max())
    with contextlib.redirect_stdout(io.StringIO()):
        load_lora_into_pipeline(SimpleNamespace(unet=base_ds), lora_path)
    reference = _run_diffsynth(base_ds, x)
    state, _ = read_lora(lora_path)
    result = ParityResult({}, float((reference - before).abs().max()), base_diff,
                          modules=len(state) // 2)
    for fmt in ("diffusers", "kohya"):
        unet = _diffusers_with_lora(weights, exports[fmt], fmt, result)
        result.max_abs_diff[fmt] = float((_run_diffusers(unet, x) - reference).abs().max())
    return result
