"""Kwai-Kolors/Kolors-Inpainting: find its UNet, make sure it is the inpainting one, load it into DiffSynth.

Kolors-Inpainting is Kolors' UNet with 9 input channels (the noisy latents,
the mask, the masked picture's latents). DiffSynth 1.1.9 builds its
``SDXLUNet`` with a 4-channel ``conv_in`` and cannot load it, so the network is
built by kstory's UNet builder at the widths ``unet/config.json`` gives (on the
meta device: nothing is allocated twice), its ``conv_in`` is swapped for a
9-channel one, and the diffusers weights go through DiffSynth's own key
converter. The story's LoRA is merged into it as into the base UNet.

A model is recorded by a content fingerprint (the config and a sampled hash
of the weights, never the path), so ``kstory verify`` can find the same
weights on another machine and refuses others.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.models import files as layout

log = get_logger("story")
KIND = "kolors-inpainting"
TINY = "tiny"  # the offline random inpainting model that fits the tiny Kolors
_FIX = ("pass the Kwai-Kolors/Kolors-Inpainting folder (its unet/ holds config.json with in_channels 9 and "
        "diffusion_pytorch_model(.fp16).safetensors), or 'tiny' with the tiny model")


@dataclass(frozen=True)
class InpaintModel:
    """A checked Kolors-Inpainting UNet: its config and weight file, and what identifies it."""

    spec: str  # as given: a folder, or 'tiny'
    config: Path
    weights: Path
    fingerprint: str
    tiny: bool

    def record(self) -> dict[str, Any]:
        """What a repair records (the spec is a hint where to look; the fingerprint decides)."""
        return {"kind": KIND, "spec": self.spec, "fingerprint": self.fingerprint, "tiny": self.tiny}


def _unet_folder(root: Path) -> Path:
    """``root/unet`` for the published folder, or ``root`` itself when it is the unet folder."""
    return root / "unet" if (root / "unet").is_dir() else root


def resolve_inpaint_model(spec: str | Path, cache_dir: Path | None = None) -> InpaintModel:
    """The inpainting UNet of ``spec`` (a folder or 'tiny'), checked cheaply: config, file framing, channels."""
    tiny = str(spec) == TINY
    if tiny:
        from kstory.story.tiny_inpaint import build_tiny_inpaint_model

        root = build_tiny_inpaint_model(cache_dir)
    else:
        root = Path(spec).expanduser().resolve()
        if not root.is_dir():
            raise KstoryError("the inpainting model folder does not exist", path=root, fix=_FIX)
    folder = _unet_folder(root)
    weights = layout.single_file(folder, _FIX)
    if weights.suffix != ".safetensors":
        raise KstoryError("the inpainting UNet must be a .safetensors file", path=weights,
                          fix="use the published diffusion_pytorch_model.fp16.safetensors, or convert the file")
    layout.safetensors_dtypes(weights)  # a file cut short is named here, before anything loads
    channels = layout.unet_input_channels(weights)
    if channels == layout.BASE_UNET_CHANNELS:
        raise KstoryError("this is the base Kolors UNet (4 input channels), not Kolors-Inpainting's (9)",
                          path=weights, fix=f"{_FIX}; the base model goes to --model")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise KstoryError("no config.json beside the inpainting UNet", path=config_path, fix=_FIX)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KstoryError(f"unreadable UNet config ({error})", path=config_path, fix=_FIX) from error
    declared = config.get("in_channels") if isinstance(config, dict) else None
    if channels != layout.INPAINT_UNET_CHANNELS or declared != layout.INPAINT_UNET_CHANNELS:
        raise KstoryError(f"not an inpainting UNet: conv_in takes {channels} channels and config.json says "
                          f"in_channels {declared}, Kolors-Inpainting has {layout.INPAINT_UNET_CHANNELS}",
                          path=weights, fix=_FIX)
    return InpaintModel(TINY if tiny else str(root), config_path, weights, _fingerprint(config_path, weights), tiny)


def _fingerprint(config: Path, weights: Path) -> str:
    from kstory.core.hashing import sampled_digest

    digest = hashlib.sha256(b"kolors-inpainting-unet\0")
    digest.update(hashlib.sha256(config.read_bytes()).digest())
    digest.update(sampled_digest(weights).encode())
    return digest.hexdigest()


def find_recorded_inpaint_model(record: dict[str, Any], given: str | Path | None = None,
                                cache_dir: Path | None = None) -> InpaintModel:
    """The inpainting model a repair recorded: ``given`` (when it is the same weights) or the recorded spec."""
    wanted = record["fingerprint"]
    tried = []
    for candidate in ([given] if given is not None else []) + [record.get("spec")]:
        if candidate is None or str(candidate) in tried:
            continue
        tried.append(str(candidate))
        try:
            model = resolve_inpaint_model(candidate, cache_dir)
        except KstoryError:
            continue
        if model.fingerprint == wanted:
            return model
    raise KstoryError(
        f"the repair used the Kolors-Inpainting UNet {wanted[:12]} (recorded as {record.get('spec')!r}); "
        f"it is not at {' or '.join(tried) or 'any given path'}",
        path=Path(str(given if given is not None else record.get("spec"))),
        fix="pass --inpaint-model PATH with the inpainting folder the repair was made with "
            "(kstory verify --inpaint-model, kstory story --inpaint-model)",
    )


def load_inpaint_unet(model: InpaintModel, device: str, torch_dtype: torch.dtype, lora: Path | None = None,
                      lora_scale: float | None = None) -> torch.nn.Module:
    """DiffSynth's ``SDXLUNet`` with a 9-channel ``conv_in`` holding ``model``'s weights (and the LoRA merged)."""
    from kstory.core.models.tensor_files import read_tensors
    from kstory.core.models.tiny import from_diffusers, tiny_unet
    from kstory.core.models.unet_config import unet_spec_from_config

    spec = unet_spec_from_config(json.loads(model.config.read_text(encoding="utf-8")), model.config)
    with torch.device("meta"):
        unet, _ = tiny_unet(spec)
        unet.conv_in = torch.nn.Conv2d(layout.INPAINT_UNET_CHANNELS, spec.unet_channels[0], kernel_size=3, padding=1)
    converted, _ = from_diffusers(unet, read_tensors(model.weights, torch_dtype))
    expected = dict(unet.state_dict())
    wrong = sorted(set(expected) ^ set(converted)) + sorted(
        k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if wrong:
        raise KstoryError(f"the inpainting UNet's tensors do not fit its config.json ({', '.join(wrong[:4])}"
                          f"{', ...' if len(wrong) > 4 else ''})", path=model.weights, fix=_FIX)
    unet.load_state_dict(converted, strict=True, assign=True)
    unet = unet.eval().to(device=device, dtype=torch_dtype)
    if lora is not None:
        from kstory.core.lora import load_lora_into_pipeline

        load_lora_into_pipeline(SimpleNamespace(unet=unet), lora, scale=lora_scale)
        log.info("the story's LoRA is merged into the inpainting UNet too")
    return unet
