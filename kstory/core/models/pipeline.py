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
from diffsynth.models.model_manager import ModelDetectorFromSingleFile, ModelManager
from diffsynth.models.sdxl_unet import SDXLUNet
from diffsynth.models.sdxl_vae_decoder import SDXLVAEDecoder
from diffsynth.models.sdxl_vae_encoder import SDXLVAEEncoder
from diffsynth.models.utils import hash_state_dict_keys
from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
from transformers.utils import logging as transformers_logging

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.models.resolve import KolorsWeights
from kstory.core.models.quantize import quantize_unet, unet_quant_config
from kstory.core.models.tensor_files import read_tensors, tensor_shapes
from kstory.core.models.tiny import load_tiny_models
from kstory.core.models.unet_int8_load import load_quantised_unet

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
    parts: tuple[str, ...] = PARTS, unet_quant: str = "none",
) -> ModelManager:
    """A DiffSynth ``ModelManager`` holding the Kolors ``parts`` (text encoder, UNet, VAE; default all).

    Loading only the parts a phase needs keeps ChatGLM (6B parameters) and the
    UNet out of memory at the same time. ``unet_quant`` (``int8``) returns the
    UNet's transformer-block Linears quantised (training's QLoRA-style base):
    as each weight is read where the file is the Kolors UNet in diffusers
    layout, after loading otherwise (tiny weights, other layouts).
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown Kolors parts {sorted(unknown)}; known: {PARTS}")
    unet_quant_config(unet_quant)  # an unknown mode fails before anything loads
    with contextlib.redirect_stdout(_PrintsToLog()):
        return _load_manager(weights, device, torch_dtype, parts, unet_quant)


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


def _streamable_unet(manager: ModelManager, path: str, shapes: dict[str, tuple[int, ...]]) -> type | None:
    """DiffSynth's UNet class when its detectors take the file ``path`` (tensor ``shapes``) for a diffusers-layout
    UNet, else None.

    The detectors match on tensor names and shapes only, so they are asked
    with meta tensors of the file's header: nothing is read. The first
    detector that matches decides, as in ``_load_converted``.
    """
    placeholders = {name: torch.empty(shape, device="meta") for name, shape in shapes.items()}
    for detector in manager.model_detector:
        if not detector.match(path, placeholders):
            continue
        if type(detector) is not ModelDetectorFromSingleFile:
            return None
        entry = (detector.keys_hash_with_shape_dict.get(hash_state_dict_keys(placeholders, with_shape=True))
                 or detector.keys_hash_dict.get(hash_state_dict_keys(placeholders, with_shape=False)))
        if entry is None:
            return None
        names, classes, resource = entry
        diffusers_unet = resource == "diffusers" and list(names) == ["sdxl_unet"] and list(classes) == [SDXLUNet]
        return SDXLUNet if diffusers_unet else None
    return None


def _load_unet(manager: ModelManager, path: str, torch_dtype: torch.dtype, unet_quant: str) -> None:
    """The UNet into ``manager``; with ``unet_quant``, its transformer-block Linears quantised while loading when
    the file allows (see ``kstory.core.models.unet_int8_load``), after loading otherwise."""
    shapes = tensor_shapes(path) if unet_quant != "none" and path.endswith(".safetensors") else None
    model_class = _streamable_unet(manager, path, shapes) if shapes is not None else None
    if model_class is None:
        _load_converted(manager, path, torch_dtype)
        _quantize_loaded_unet(manager, unet_quant)
        return
    model, count = load_quantised_unet(path, model_class, torch_dtype, unet_quant, device=manager.device,
                                       shapes=shapes)
    manager.model.append(model)
    manager.model_path.append(path)
    manager.model_name.append("sdxl_unet")
    log.info("UNet: %d attention and feed-forward weights stored as %s (QLoRA-style), each as it was read",
             count, unet_quant)


def _quantize_loaded_unet(manager: ModelManager, unet_quant: str) -> None:
    """Files the streamed load does not take (tiny weights, other layouts): the whole UNet loaded, then quantised."""
    if unet_quant == "none" or "sdxl_unet" not in manager.model_name:
        return
    count = quantize_unet(manager.model[manager.model_name.index("sdxl_unet")], unet_quant)
    log.info("UNet: %d attention and feed-forward weights stored as %s (QLoRA-style), after loading",
             count, unet_quant)


def _load_manager(weights: KolorsWeights, device: str, torch_dtype: torch.dtype, parts: tuple[str, ...],
                  unet_quant: str) -> ModelManager:
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
        _quantize_loaded_unet(manager, unet_quant)
    else:
        if "unet" in parts:
            _load_unet(manager, str(weights.unet), torch_dtype, unet_quant)
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
