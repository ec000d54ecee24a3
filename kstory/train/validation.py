"""Validation images during training, from cached prompt embeddings.

The text encoder is freed before training, so instead of calling the whole
pipeline this runs the same DDIM sampling loop as DiffSynth's
``SDXLImagePipeline.__call__`` (Kolors scheduler, classifier-free guidance)
on the training UNet with its LoRA active, and decodes with the VAE decoder,
which waits on the CPU between validations. Noise comes from a CPU generator
so an image depends on its seed, not on the device.
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from kstory.core.atomic import write_bytes, write_json
from kstory.core.train_settings import ValidationPrompt


def kolors_scheduler():
    """DiffSynth's Kolors sampling scheduler (what ``fetch_models`` installs for Kolors)."""
    from diffsynth.schedulers import EnhancedDDIMScheduler

    return EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)


def _embeddings(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    return {
        "encoder_hidden_states": tensors["prompt_emb"].unsqueeze(0).to(device),
        "add_text_embeds": tensors["pooled"].unsqueeze(0).to(device),
    }


@torch.no_grad()
def sample_latents(
    unet: torch.nn.Module, positive: dict[str, torch.Tensor], negative: dict[str, torch.Tensor], *,
    width: int, height: int, seed: int, steps: int, cfg_scale: float, device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """DDIM with classifier-free guidance, as DiffSynth's SDXL pipeline does it."""
    scheduler = kolors_scheduler()
    scheduler.set_timesteps(steps)
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn((1, 4, height // 8, width // 8), generator=generator).to(device)
    add_time_id = torch.tensor([height, width, 0, 0, height, width], device=device)
    context = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with context:
        for timestep in scheduler.timesteps:
            t = timestep.unsqueeze(0).to(device)
            posi = unet(latents, timestep=t, add_time_id=add_time_id, **positive).float()
            if cfg_scale != 1.0:
                nega = unet(latents, timestep=t, add_time_id=add_time_id, **negative).float()
                prediction = nega + cfg_scale * (posi - nega)
            else:
                prediction = posi
            latents = scheduler.step(prediction, t, latents)
    return latents


@torch.no_grad()
def decode(vae_decoder: torch.nn.Module, latents: torch.Tensor, device: torch.device) -> Image.Image:
    """VAE decode in float32 (as DiffSynth does), then to an 8-bit RGB image."""
    vae_decoder.to(device)
    try:
        dtype = next(vae_decoder.parameters()).dtype
        image = vae_decoder(latents.to(device, dtype))[0].float().cpu()
    finally:
        vae_decoder.to("cpu")
    array = ((image.permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array)


def render_validation(
    out_dir: Path, step: int, unet: torch.nn.Module, vae_decoder: torch.nn.Module,
    prompts: list[ValidationPrompt], texts: dict[str, Path], *, resolution: int, steps: int,
    cfg_scale: float, device: torch.device, autocast_dtype: torch.dtype | None = None,
) -> Path:
    """Write ``validation/step-XXXXXX/NN-seedS.png`` plus ``prompts.json``; returns the folder.

    ``texts`` maps every prompt, negative prompt and "" to its cached embedding file.
    """
    folder = Path(out_dir) / "validation" / f"step-{step:06d}"
    was_training = unet.training
    unet.eval()
    try:
        index = []
        for number, item in enumerate(prompts):
            positive = _embeddings(texts[item.prompt], device)
            negative = _embeddings(texts[item.negative_prompt], device)  # "" is the empty caption
            latents = sample_latents(
                unet, positive, negative,
                width=resolution, height=resolution, seed=item.seed, steps=steps, cfg_scale=cfg_scale,
                device=device, autocast_dtype=autocast_dtype,
            )
            buffer = io.BytesIO()
            decode(vae_decoder, latents, device).save(buffer, format="PNG")
            name = f"{number:02d}-seed{item.seed}.png"
            write_bytes(folder / name, buffer.getvalue())
            index.append({"file": name, **item.model_dump()})
        write_json(folder / "prompts.json", {"step": step, "images": index})
    finally:
        unet.train(was_training)
    return folder


def validation_texts(prompts: list[ValidationPrompt]) -> list[str]:
    """Every text the validation needs encoded (prompts and negative prompts)."""
    return sorted({p.prompt for p in prompts} | {p.negative_prompt for p in prompts if p.negative_prompt})

