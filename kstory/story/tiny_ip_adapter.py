"""A tiny random-weight Kolors IP-Adapter-Plus that fits kstory's tiny Kolors, for tests, the demo and CPU runs.

Written in the published layout (``ip_adapter_plus_general`` beside an
``image_encoder/`` folder whose weight file holds a whole CLIP), so it goes
through the same loaders and checks as the real one. The Resampler keeps the
real topology (16 queries, depth 4, heads of 64) at small widths, and the
image encoder is a CLIP ViT/14 at 336 px (577 hidden states) only 32 wide.
Its outputs mean nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models import default_cache_dir
from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet
from kstory.story.ip_adapter import ENCODER_DIR, ImageKeysValues, Resampler, cross_attention_sites
from kstory.story.tiny import random_init

TINY_DIR = "tiny-ip-adapter-v1"
ADAPTER_FILE = "ip_adapter_plus_general.safetensors"
ENCODER_WIDTH = 32  # 1024 in CLIP ViT-L/14
RESAMPLER_WIDTH = 64  # 2048
IMAGE_SIZE = 336  # as the real encoder: 24 x 24 patches of 14 px + the class token = 577 states
_PREPROCESSOR = {  # CLIP's own normalisation, at 336 px, as Kolors' image_encoder/preprocessor_config.json
    "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "do_normalize": True,
    "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_convert_rgb": True, "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": IMAGE_SIZE},
}


def tiny_clip_config() -> dict:
    """A whole-CLIP config (text and vision towers) at tiny widths; the vision tower is ViT/14 at 336 px."""
    return {
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 16,
        "vision_config": {"hidden_size": ENCODER_WIDTH, "intermediate_size": 64, "num_hidden_layers": 3,
                          "num_attention_heads": 2, "image_size": IMAGE_SIZE, "patch_size": 14,
                          "projection_dim": 16, "hidden_act": "quick_gelu"},
        "text_config": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                        "num_attention_heads": 2, "vocab_size": 100, "max_position_embeddings": 16,
                        "projection_dim": 16, "hidden_act": "quick_gelu"},
    }


def write_tiny_image_encoder(folder: Path, seed: int = 0) -> Path:
    """``config.json`` (the whole CLIP's), ``model.safetensors`` (every tower) and ``preprocessor_config.json``."""
    from transformers import CLIPConfig, CLIPModel

    config = tiny_clip_config()
    model = random_init(CLIPModel(CLIPConfig(**{k: v for k, v in config.items() if k != "model_type"})), seed)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    write_json(folder / "config.json", config)
    write_json(folder / "preprocessor_config.json", _PREPROCESSOR)
    return folder


def tiny_adapter_state(spec: TinyKolorsSpec = TinyKolorsSpec(), seed: int = 1,
                       resampler_width: int = RESAMPLER_WIDTH, unet: torch.nn.Module | None = None,
                       ) -> dict[str, torch.Tensor]:
    """The flat ``image_proj.*`` / ``ip_adapter.*`` tensors of a random adapter for the UNet ``spec`` describes
    (``unet``: that UNet, already built, so a large one is not built twice)."""
    sites = cross_attention_sites(unet if unet is not None else tiny_unet(spec)[0])
    resampler = random_init(Resampler(ENCODER_WIDTH, resampler_width, spec.cross_attention_dim, depth=4,
                                      heads=max(1, resampler_width // 64), queries=16), seed)
    layers = random_init(ImageKeysValues(sites, spec.cross_attention_dim), seed + 1)
    flat = {f"image_proj.{k}": v for k, v in resampler.state_dict().items()}
    for i in range(len(sites)):
        flat[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = layers.to_k_ip[i].weight
        flat[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = layers.to_v_ip[i].weight
    return {k: v.detach().contiguous() for k, v in flat.items()}


def write_tiny_ip_adapter(folder: Path, *, pickle: bool = False, seed: int = 1) -> Path:
    """The tiny adapter in ``folder``: the flat safetensors form, or (``pickle``) the published ``.bin`` nesting."""
    folder.mkdir(parents=True, exist_ok=True)
    flat = tiny_adapter_state(seed=seed)
    if pickle:
        nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
        for key, value in flat.items():
            part, _, name = key.partition(".")
            nested[part][name] = value.half()
        torch.save(nested, folder / "ip_adapter_plus_general.bin")
    else:
        save_file(flat, str(folder / ADAPTER_FILE), metadata={"format": "pt"})
    write_tiny_image_encoder(folder / ENCODER_DIR)
    return folder


def build_tiny_ip_adapter(cache_dir: Path | None = None) -> Path:
    """Build (once) and return the tiny adapter folder in the model cache."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / TINY_DIR
    done = (root / ADAPTER_FILE).is_file() and (root / ENCODER_DIR / "model.safetensors").is_file()
    if not done:
        if root.exists():
            shutil.rmtree(root)  # our own cache entry, half-written
        try:
            with atomic_directory(root) as staging:
                write_tiny_ip_adapter(staging)
        except (OSError, FileExistsError):
            if not (root / ADAPTER_FILE).is_file():
                raise
    return root
