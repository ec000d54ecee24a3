"""Fill the latent/embedding cache with the encoders alone, free them, then load the UNet: one phase at a time."""

from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.logs import get_logger
from kstory.core.memory import free_models  # noqa: F401 - re-exported
from kstory.core.ranks import local_rank
from kstory.core.out_of_memory import out_of_memory_named
from kstory.core.models.resolve import KolorsWeights
from kstory.train.cache import Encoders, MissingCache, TrainCache, build_cache, cache_root
from kstory.train.dataset import Sample
from kstory.train.memory_advice import caching_memory_fix, unet_load_memory_fix
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
    """One phase at a time: encode what the cache lacks and free the encoders, then load the UNet.

    ChatGLM is loaded only when a caption is missing from the cache and the VAE
    only when an image is; both are gone before the UNet loads, so the peak is
    the larger phase, not their sum.
    """
    from kstory.core.models.pipeline import load_kolors_model_manager

    root = cache_root(cache_base, weights.fingerprint, runtime.weight_dtype, runtime.cache_tag)
    options = {"resolution": settings.resolution, "center_crop": settings.center_crop,
               "random_flip": settings.random_flip, "extra_texts": validation_texts(settings.validation_prompts)}
    try:
        cache = build_cache(samples, None, root, **options)
        log.info("every caption and image is cached (%s): the text encoder and VAE encoder are not loaded", root)
    except MissingCache as missing:
        if local_rank() > 0:
            cache = _wait_for_cache(samples, root, options, missing)
        else:
            with out_of_memory_named(f"encoding captions and images for the cache at {settings.resolution} px",
                                     caching_memory_fix(settings, runtime)):
                cache = _encode(weights, samples, runtime, root, options, missing)
    parts = ("unet", "vae") if settings.validation_prompts else ("unet",)
    log.info("loading the UNet of %s (%s)%s", weights.identity, str(runtime.weight_dtype).removeprefix("torch."),
             " and the VAE decoder for validation images" if settings.validation_prompts else "")
    with contextlib.redirect_stdout(io.StringIO()), \
            out_of_memory_named("loading the UNet", unet_load_memory_fix(settings, runtime)):  # DiffSynth prints as it loads
        # unet_quant int8: the UNet arrives with its base weights already integer (the trainer never quantises).
        manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=runtime.weight_dtype, parts=parts,
                                            unet_quant=settings.unet_quant)
        unet = manager.fetch_model("sdxl_unet")
        decoder = manager.fetch_model("sdxl_vae_decoder") if settings.validation_prompts else None
    removed = _drop_from_manager(manager, keep={"sdxl_unet", "sdxl_vae_decoder"})  # the VAE encoder goes
    del manager
    free_models(*removed)
    return Prepared(cache, unet, decoder)


CACHE_POLL_SECONDS = 5.0


def _wait_for_cache(samples: list[Sample], root: Path, options: dict[str, Any], missing: MissingCache) -> TrainCache:
    """A machine's ranks > 0 read the cache its local rank 0 fills: the encoders load once per machine.

    Under Lightning's launcher the cache is complete before they start; under
    torchrun or srun every process starts at once, and these wait here (the
    launcher ends them if rank 0 fails).
    """
    log.info("waiting for local rank 0 to cache %d caption(s) and %d image(s) in %s", missing.texts, missing.images,
             root)
    while True:
        time.sleep(CACHE_POLL_SECONDS)
        try:
            return build_cache(samples, None, root, **options)
        except MissingCache:
            continue


def _encode(weights: KolorsWeights, samples: list[Sample], runtime: Runtime, root: Path, options: dict[str, Any],
            missing: MissingCache) -> TrainCache:
    """Load only the encoders the missing entries need, fill the cache, and free them."""
    from kstory.core.models.pipeline import load_kolors_model_manager
    from kstory.core.models.quantize import quantize_text_encoder

    streamed = runtime.text_streamed and missing.texts
    parts = (("text_encoder",) if missing.texts and not streamed else ()) + (("vae",) if missing.images else ())
    log.info("loading %s of %s (%s) to encode %d caption(s) and %d image(s)",
             " and ".join([p.replace("_", " ") for p in parts] + (["the text encoder block by block"] if streamed else [])),
             weights.identity,
             str(runtime.text_encoder_dtype).removeprefix("torch."), missing.texts, missing.images)
    with contextlib.redirect_stdout(io.StringIO()):
        manager = load_kolors_model_manager(weights, device="cpu", torch_dtype=runtime.text_encoder_dtype,
                                            parts=parts)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            text_encoder, vae_encoder = (manager.fetch_model(name) for name in ("kolors_text_encoder", "sdxl_vae_encoder"))
        if text_encoder is not None and not streamed:
            quantize_text_encoder(text_encoder, runtime.text_quant)
        if streamed:
            from kstory.core.models.streamed_text_encoder import StreamedChatGLM

            text_encoder = StreamedChatGLM(weights.text_encoder, device=runtime.text_encoder_device,
                                           dtype=runtime.text_encoder_dtype, quant=runtime.text_quant)
        encoders = Encoders(text_encoder, vae_encoder, runtime.device, text_device=runtime.text_encoder_device)
        del text_encoder, vae_encoder
        try:
            return build_cache(samples, encoders, root, **options)
        finally:
            encoders.release()
    finally:
        free_models(*_drop_from_manager(manager, keep=set()))
