"""Load the base model, fill the latent/embedding cache, and free everything the UNet step does not need."""

from __future__ import annotations

import contextlib
import gc
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.logs import get_logger
from kstory.core.models.resolve import KolorsWeights
from kstory.train.cache import Encoders, MissingCache, TrainCache, build_cache, cache_root
from kstory.train.dataset import Sample
from kstory.train.runtime import Runtime
from kstory.core.train_settings import TrainSettings
from kstory.train.validation import validation_texts

log = get_logger("train")


@dataclass
class Prepared:
    """What training keeps: the cache, the UNet, and the VAE decoder only if validation needs it."""

    cache: TrainCache
    unet: torch.nn.Module
    vae_decoder: torch.nn.Module | None


def free_models(*modules: Any) -> None:
    """Give big models' memory back: storage moved to 'meta' (even if a reference survives), gc, CUDA cache."""
    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _drop_from_manager(manager: Any, keep: set[str]) -> list[Any]:
    """Remove every model but ``keep`` from a DiffSynth ModelManager; returns the removed models."""
    entries = list(zip(manager.model, manager.model_name, manager.model_path, strict=True))
    manager.model = [m for m, name, _ in entries if name in keep]
    manager.model_path = [p for _, name, p in entries if name in keep]
    manager.model_name = [name for _, name, _ in entries if name in keep]
    return [m for m, name, _ in entries if name not in keep]


def prepare(
    weights: KolorsWeights, samples: list[Sample], settings: TrainSettings, runtime: Runtime, cache_base: Path,
) -> Prepared:
    """Encode what the cache lacks (text encoder and VAE on the device), then free both encoders."""
    from kstory.core.models.pipeline import kolors_models, load_kolors_model_manager

    log.info("loading %s (%s)", weights.identity, str(runtime.weight_dtype).removeprefix("torch."))
    with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth prints every model it loads and fetches
        manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=runtime.weight_dtype)
        nets = kolors_models(manager)
    root = cache_root(cache_base, weights.fingerprint, runtime.weight_dtype)
    options = {"resolution": settings.resolution, "center_crop": settings.center_crop,
               "random_flip": settings.random_flip, "extra_texts": validation_texts(settings.validation_prompts)}
    try:
        cache = build_cache(samples, None, root, **options)
    except MissingCache:
        cache = build_cache(samples, Encoders(nets.text_encoder, nets.vae_encoder, runtime.device), root, **options)
    keep = {"sdxl_unet"} | ({"sdxl_vae_decoder"} if settings.validation_prompts else set())
    prepared = Prepared(cache, nets.unet, nets.vae_decoder if settings.validation_prompts else None)
    removed = _drop_from_manager(manager, keep)
    del nets, manager
    free_models(*removed)
    return prepared
