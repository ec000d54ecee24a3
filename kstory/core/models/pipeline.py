"""Load resolved Kolors weights into DiffSynth's Kolors image pipeline.

Real and tiny weights end in the same ``ModelManager`` and go through the
same ``SDXLImagePipeline.from_model_manager``, so everything downstream
(prompter choice, scheduler, LoRA loading, training hooks) behaves alike.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import torch
from diffsynth.models.kolors_text_encoder import ChatGLMModel
from diffsynth.models.model_manager import ModelManager
from diffsynth.models.sdxl_unet import SDXLUNet
from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
from transformers.utils import logging as transformers_logging

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.models.resolve import KolorsWeights
from kstory.core.models.tiny import load_tiny_models

log = get_logger("models")

# ModelManager names that SDXLImagePipeline.fetch_models looks up, and the file each comes from.
_REQUIRED = {
    "kolors_text_encoder": "text_encoder",
    "sdxl_unet": "unet",
    "sdxl_vae_encoder": "vae",
    "sdxl_vae_decoder": "vae",
}


@dataclass(frozen=True)
class KolorsModels:
    """The four Kolors networks, for code (training) that needs them one by one."""

    text_encoder: ChatGLMModel
    unet: SDXLUNet
    vae_encoder: SDXLVAEEncoder
    vae_decoder: SDXLVAEDecoder


class _PrintsToLog(io.TextIOBase):
    """DiffSynth narrates model loading with print(); keep that in the log file, off the terminal."""

    def write(self, text: str) -> int:
        if text.strip():
            log.debug("%s", text.rstrip())
        return len(text)


def load_kolors_model_manager(
    weights: KolorsWeights, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> ModelManager:
    """A DiffSynth ``ModelManager`` holding the Kolors text encoder, UNet and VAE."""
    with contextlib.redirect_stdout(_PrintsToLog()):
        return _load_manager(weights, device, torch_dtype)


def _load_manager(weights: KolorsWeights, device: str, torch_dtype: torch.dtype) -> ModelManager:
    manager = ModelManager(torch_dtype=torch_dtype, device=device)
    # DiffSynth passes transformers' deprecated ``torch_dtype``; the warning is not the user's to fix.
    transformers_logging.set_verbosity_error()
    if weights.is_tiny:
        # DiffSynth detects the text encoder folder by its config.json; the
        # tiny UNet/VAE would be instantiated full size, so they are built at
        # tiny width and registered the way ModelManager registers its own.
        _load_text_encoder(manager, weights, device, torch_dtype)
        paths = {"sdxl_unet": weights.unet, "sdxl_vae_encoder": weights.vae, "sdxl_vae_decoder": weights.vae}
        for name, model in load_tiny_models(weights, device=device, torch_dtype=torch_dtype).items():
            manager.model.append(model)
            manager.model_path.append(str(paths[name]))
            manager.model_name.append(name)
    else:
        _load_text_encoder(manager, weights, device, torch_dtype)
        manager.load_models([str(weights.unet), str(weights.vae)])
    for name, slot in _REQUIRED.items():
        if name not in manager.model_name:
            raise KstoryError(
                f"DiffSynth did not recognise this file as a Kolors {slot} (no {name} was loaded)",
                path=getattr(weights, slot),
                fix="use the published file unchanged, or 'kolors' to download it",
            )
    return manager


def _load_text_encoder(manager: ModelManager, weights: KolorsWeights, device: str, torch_dtype: torch.dtype) -> None:
    """ChatGLM through ``from_pretrained``, as DiffSynth loads it, naming the fp16 variant when needed.

    DiffSynth finds the folder by its config.json and calls ``from_pretrained``
    without a variant, which cannot see Kolors-diffusers' ``model.fp16-*``
    shards; for those the same call is made here with ``variant`` set.
    """
    if weights.text_encoder_variant is None:
        manager.load_model(str(weights.text_encoder))
        return
    model = ChatGLMModel.from_pretrained(
        str(weights.text_encoder), torch_dtype=torch_dtype, variant=weights.text_encoder_variant
    ).eval()
    manager.model.append(model.to(device=device))
    manager.model_path.append(str(weights.text_encoder))
    manager.model_name.append("kolors_text_encoder")


def kolors_models(manager: ModelManager) -> KolorsModels:
    """The loaded networks of a manager from :func:`load_kolors_model_manager`."""
    return KolorsModels(
        text_encoder=manager.fetch_model("kolors_text_encoder"),
        unet=manager.fetch_model("sdxl_unet"),
        vae_encoder=manager.fetch_model("sdxl_vae_encoder"),
        vae_decoder=manager.fetch_model("sdxl_vae_decoder"),
    )


def load_kolors_pipeline(
    weights: KolorsWeights, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> SDXLImagePipeline:
    """DiffSynth's Kolors text-to-image pipeline for ``weights``.

    The networks are ``pipe.text_encoder_kolors``, ``pipe.unet``,
    ``pipe.vae_encoder`` and ``pipe.vae_decoder``; ``pipe.prompter`` is
    DiffSynth's ``KolorsPrompter`` (bundled ChatGLM tokenizer).
    """
    manager = load_kolors_model_manager(weights, device, torch_dtype)
    with contextlib.redirect_stdout(_PrintsToLog()):
        return SDXLImagePipeline.from_model_manager(manager)
