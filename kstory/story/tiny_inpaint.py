"""A tiny random-weight Kolors-Inpainting UNet that fits kstory's tiny Kolors, for tests, the demo and CPU runs.

Written in the published layout (``unet/config.json`` with ``in_channels: 9``
beside ``unet/diffusion_pytorch_model.safetensors`` in diffusers keys), so it
goes through the same checks and loader as Kwai-Kolors/Kolors-Inpainting.
Its outputs mean nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models import default_cache_dir
from kstory.core.models.files import INPAINT_UNET_CHANNELS
from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet, unet_to_diffusers
from kstory.core.models.unet_config import diffusers_unet_config
from kstory.story.tiny import random_init

TINY_DIR = "tiny-inpainting-v1"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


def inpaint_unet_state(spec: TinyKolorsSpec = TinyKolorsSpec(), seed: int = 7) -> dict[str, torch.Tensor]:
    """Random diffusers-keyed weights of a 9-input-channel Kolors UNet at ``spec``'s widths."""
    unet, prefixes = tiny_unet(spec)
    unet.conv_in = torch.nn.Conv2d(INPAINT_UNET_CHANNELS, spec.unet_channels[0], kernel_size=3, padding=1)
    random_init(unet, seed)
    return unet_to_diffusers({k: v.detach().contiguous() for k, v in unet.state_dict().items()}, prefixes)


def write_tiny_inpaint_model(folder: Path, spec: TinyKolorsSpec = TinyKolorsSpec(), seed: int = 7) -> Path:
    """The tiny inpainting model in ``folder`` (``unet/`` only, as kstory reads Kolors-Inpainting)."""
    (folder / "unet").mkdir(parents=True, exist_ok=True)
    save_file(inpaint_unet_state(spec, seed), str(folder / UNET_WEIGHTS), metadata={"format": "pt"})
    write_json(folder / UNET_CONFIG, diffusers_unet_config(spec, in_channels=INPAINT_UNET_CHANNELS))
    return folder


def build_tiny_inpaint_model(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the tiny inpainting model folder in the model cache."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / TINY_DIR
    done = (root / UNET_WEIGHTS).is_file() and (root / UNET_CONFIG).is_file()
    if not done:
        if root.exists():
            shutil.rmtree(root)  # our own cache entry, half-written
        try:
            with atomic_directory(root) as staging:
                write_tiny_inpaint_model(staging)
        except (OSError, FileExistsError):
            if not (root / UNET_WEIGHTS).is_file():
                raise
    return root
