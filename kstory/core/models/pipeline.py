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
from kstory.core.models.tensor_files import read_tensors
from kstory.core.models.tiny import load_tiny_models

log = get_logger("models")

# ModelManager names that SDXLImagePipeline.fetch_models looks up, and the file each comes from.
_REQUIRED = {
    "kolors_text_encoder": "text_encoder",
    "sdxl_unet": "unet",
    "sdxl_vae_encoder": "vae",
    "sdxl_vae_decoder": "vae",
}
PARTS = ("text_encoder", "unet", "vae")  # what a caller may load on its own, one phase at a time


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
    weights: KolorsWeights, device: str = "cpu", torch_dtype: torch.dtype = torch.float32,
    parts: tuple[str, ...] = PARTS,
) -> ModelManager:
    """A DiffSynth ``ModelManager`` holding the Kolors ``parts`` (text encoder, UNet, VAE; default all).

    Loading only the parts a phase needs keeps ChatGLM (6B parameters) and the
    UNet out of memory at the same time.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown Kolors parts {sorted(unknown)}; known: {PARTS}")
    with contextlib.redirect_stdout(_PrintsToLog()):
        return _load_manager(weights, device, torch_dtype, parts)


def _load_converted(manager: ModelManager, path: str, torch_dtype: torch.dtype) -> None:
    """``ModelManager.load_model`` with each tensor converted to ``torch_dtype`` as it is read.

    DiffSynth reads the whole file through one memory map in its stored dtype
    and converts afterwards, holding the file's pages and the converted copy at
    once; reading window by window, converting as it goes, holds about one copy
    (an fp16 UNet loads as bf16 in 5 GB, not 5 + 5).
    """
    state_dict = read_tensors(path, torch_dtype)
    for detector in manager.model_detector:
        if detector.match(path, state_dict):
            names, models = detector.load(path, state_dict, device=manager.device, torch_dtype=torch_dtype,
                                          allowed_model_names=None, model_manager=manager)
            for name, model in zip(names, models):
                manager.model.append(model)
                manager.model_path.append(path)
                manager.model_name.append(name)
            return


def _load_manager(weights: KolorsWeights, device: str, torch_dtype: torch.dtype, parts: tuple[str, ...]) -> ModelManager:
    manager = ModelManager(torch_dtype=torch_dtype, device=device)
    # DiffSynth passes transformers' deprecated ``torch_dtype``; the warning is not the user's to fix.
    transformers_logging.set_verbosity_error()
    if "text_encoder" in parts:
        _load_text_encoder(manager, weights, device, torch_dtype)  # transformers converts shard by shard
    if weights.is_tiny:
        # The tiny UNet/VAE would be instantiated full size by DiffSynth's
        # detectors, so they are built at tiny width and registered the way
        # ModelManager registers its own.
        paths = {"sdxl_unet": weights.unet, "sdxl_vae_encoder": weights.vae, "sdxl_vae_decoder": weights.vae}
        wanted = [p for p in parts if p != "text_encoder"]
        for name, model in load_tiny_models(weights, device=device, torch_dtype=torch_dtype, parts=wanted).items():
            manager.model.append(model)
            manager.model_path.append(str(paths[name]))
            manager.model_name.append(name)
    else:
        if "unet" in parts:
            _load_converted(manager, str(weights.unet), torch_dtype)
        if "vae" in parts:
            manager.load_model(str(weights.vae))  # kept as stored: DiffSynth upcasts the VAE to float32
    for name, slot in _REQUIRED.items():
        if slot in parts and name not in manager.model_name:
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
