"""What a resolved model is: ``KolorsWeights``, and the marker file of the tiny build.

Its own module so that the resolver (which builds the tiny model on demand) and
the tiny builder (which writes the marker and returns weights) both depend on
it instead of on each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPEC_FILE = "kstory_tiny.json"  # marks a folder as a tiny model (written by kstory.core.models.tiny)


@dataclass(frozen=True)
class KolorsWeights:
    """Local, validated Kolors weights.

    ``fingerprint`` identifies the content (a hash over each weight file's
    layout name, size, safetensors header and 64 pages sampled across the
    file), so it changes when weights are replaced or fine-tuned and can key
    caches of latents or prompt embeddings.
    """

    root: Path
    text_encoder: Path  # folder, loaded by DiffSynth's ChatGLMModel.from_pretrained
    unet: Path
    vae: Path
    identity: str
    is_tiny: bool
    fingerprint: str
    # Read from the tensors, never from file names (an fp16 file can carry a plain name); for memory planning.
    text_encoder_dtype: str = "unknown"
    unet_dtype: str = "unknown"
    vae_dtype: str = "unknown"
    text_encoder_variant: str | None = None  # "fp16" when only variant-named files exist (Kolors-diffusers)
