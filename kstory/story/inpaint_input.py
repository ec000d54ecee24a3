"""What an inpainting UNet sees besides the latents: the mask and the masked picture, at latent size.

Kolors-Inpainting is used as diffusers' SDXL inpainting pipeline (which the
official Kolors inpainting code follows) uses a 9-channel UNet: its input is
the scaled latents, then the mask (1: repaint) shrunk to latent size by
nearest-neighbour interpolation, then the VAE latents of the picture with the
repainted part set to 0 (mid grey in the VAE's [-1, 1] range). One difference:
the masked picture's latents are the VAE encoder's mean (what DiffSynth's
encoder and kstory's img2img use), not a sample drawn from it, so a repair
does not depend on an extra random draw.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from PIL import Image


class PixelEncoder(Protocol):
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor: ...


def inpaint_condition(encoder: PixelEncoder, source: Image.Image, mask: np.ndarray) -> torch.Tensor:
    """(1, 5, H/8, W/8): the mask at latent size, then the masked picture's latents (``mask`` True: repaint)."""
    pixels = torch.from_numpy(np.asarray(source.convert("RGB"), dtype=np.float32) * (2 / 255) - 1).permute(2, 0, 1)[None]
    repaint = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None, None]
    masked_latents = encoder.encode_pixels(pixels * (repaint < 0.5))
    latent_mask = torch.nn.functional.interpolate(repaint, size=tuple(masked_latents.shape[-2:]))
    return torch.cat([latent_mask.to(masked_latents), masked_latents], dim=1)
