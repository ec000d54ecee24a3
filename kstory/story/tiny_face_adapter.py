"""A tiny random-weight Kolors IP-Adapter-FaceID-Plus that fits kstory's tiny Kolors, for tests and CPU runs.

Written in the published layout (``ipa-faceid-plus.bin`` with ``image_proj`` and
``adapter_modules``, beside ``clip-vit-large-patch14-336/`` holding a whole CLIP),
so it goes through the same loaders and checks as the real one. It keeps the
real topology (a 512-d embedding, 6 tokens, a depth-4 perceiver with heads of
64) at the tiny text width. Its outputs mean nothing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet
from kstory.story.face_adapter import EMBEDDING_WIDTH, FACE_ENCODER_DIR, FaceProjection, FaceShape
from kstory.story.ip_adapter import ImageKeysValues, cross_attention_sites
from kstory.story.tiny import random_init
from kstory.story.tiny_ip_adapter import ENCODER_WIDTH, write_tiny_image_encoder

FACE_TOKENS = 6


def tiny_face_state(spec: TinyKolorsSpec = TinyKolorsSpec(), seed: int = 7) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "adapter_modules": ...}`` of a random FaceID-Plus for the tiny UNet."""
    unet, _ = tiny_unet(spec)
    sites = cross_attention_sites(unet)
    shape = FaceShape(embedding=EMBEDDING_WIDTH, features=ENCODER_WIDTH, width=spec.text_hidden_size, depth=4,
                      heads=max(1, spec.text_hidden_size // 64), tokens=FACE_TOKENS, layers=len(sites))
    projection = random_init(FaceProjection(shape), seed)
    layers = random_init(ImageKeysValues(sites, spec.cross_attention_dim), seed + 1)
    modules = {}
    for i in range(len(sites)):
        modules[f"{2 * i + 1}.to_k_ip.weight"] = layers.to_k_ip[i].weight
        modules[f"{2 * i + 1}.to_v_ip.weight"] = layers.to_v_ip[i].weight
    return {"image_proj": {k: v.detach().contiguous() for k, v in projection.state_dict().items()},
            "adapter_modules": {k: v.detach().contiguous() for k, v in modules.items()}}


def write_tiny_face_adapter(folder: Path, *, safetensors: bool = False, seed: int = 7) -> Path:
    """The tiny adapter in ``folder``: the published fp16 ``.bin`` nesting, or the flat safetensors form."""
    folder.mkdir(parents=True, exist_ok=True)
    state = tiny_face_state(seed=seed)
    if safetensors:
        flat = {f"{part}.{k}": v for part, tensors in state.items() for k, v in tensors.items()}
        save_file(flat, str(folder / "ipa-faceid-plus.safetensors"), metadata={"format": "pt"})
    else:
        torch.save({part: {k: v.half() for k, v in tensors.items()} for part, tensors in state.items()},
                   folder / "ipa-faceid-plus.bin")
    write_tiny_image_encoder(folder / FACE_ENCODER_DIR)
    return folder


TINY_DIR = "tiny-faceid-plus-v1"


def build_tiny_face_adapter(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the tiny FaceID-Plus folder in the model cache."""
    import shutil

    from kstory.core.atomic import atomic_directory
    from kstory.core.models import default_cache_dir

    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / TINY_DIR
    done = (root / "ipa-faceid-plus.bin").is_file() and (root / FACE_ENCODER_DIR / "model.safetensors").is_file()
    if not done:
        if root.exists():
            shutil.rmtree(root)  # our own cache entry, half-written
        try:
            with atomic_directory(root) as staging:
                write_tiny_face_adapter(staging)
        except (OSError, FileExistsError):
            if not (root / "ipa-faceid-plus.bin").is_file():
                raise
    return root
