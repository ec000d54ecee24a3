"""Tiny random-weight ControlNets that fit kstory's tiny Kolors, for tests, the demo and CPU dry runs.

Written exactly like the real files (a diffusers ControlNetModel folder per
Kolors ControlNet, a diffusers-keyed safetensors file for the Union one) so
they go through the same loaders. Their outputs mean nothing.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models import default_cache_dir
from kstory.core.models.tiny import TinyKolorsSpec
from kstory.story.controlnet_kolors import WEIGHTS_NAME, KolorsControlNet, KolorsControlNetConfig, diffsynth_to_diffusers
from kstory.story.controlnet_union import TinyUnionSpec, save_tiny_union, tiny_union

TINY_DIR = "tiny-controlnets-v1"
KOLORS_KINDS = ("canny", "pose", "depth")  # one folder each, like Kwai-Kolors/Kolors-ControlNet-*
_NORMS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def tiny_kolors_controlnet_config(
    spec: TinyKolorsSpec = TinyKolorsSpec(), conditioning: tuple[int, ...] = (8, 16, 16, 32)
) -> KolorsControlNetConfig:
    """The Kolors ControlNet layout at the model's widths (the real one mirrors the Kolors UNet).

    ``conditioning`` is the guide encoder's widths; the published ones are (16, 32, 96, 256).
    """
    channels = spec.unet_channels
    return KolorsControlNetConfig(
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=2,
        heads=tuple(max(1, c // spec.unet_head_dim) for c in channels),
        transformer_layers=(1, *spec.unet_transformer_depth),
        cross_attention_dim=spec.cross_attention_dim,
        encoder_hid_dim=spec.text_hidden_size,
        addition_time_embed_dim=spec.addition_time_embed_dim,
        projection_class_embeddings_input_dim=spec.text_hidden_size + 6 * spec.addition_time_embed_dim,
        conditioning_channels=3,
        conditioning_embedding_out_channels=conditioning,
        norm_num_groups=32,
        norm_eps=1e-5,
        use_linear_projection=True,
        bgr=False,
        global_pool=False,
    )


def random_init(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seed every parameter from (seed, name); norms start at identity. Zero convs get random weights too,
    so a tiny ControlNet visibly changes the frames."""
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                if isinstance(module, _NORMS):
                    param.fill_(1.0 if param_name == "weight" else 0.0)
                    continue
                digest = hashlib.sha256(f"{seed}/{module_name}.{param_name}".encode()).digest()
                generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
                fan_in = param[0].numel() if param.dim() > 1 else param.numel()
                param.copy_(torch.randn(param.shape, generator=generator) / fan_in**0.5)
    return model.eval()


def _complete(root: Path) -> bool:
    return (root / "union.safetensors").is_file() and all((root / kind / WEIGHTS_NAME).is_file() for kind in KOLORS_KINDS)


def build_tiny_controlnets(cache_dir: Path | None = None) -> dict[str, Path]:
    """Build (once) and return {"canny", "pose", "depth": Kolors ControlNet folders, "union": Union file}."""
    root = Path(cache_dir if cache_dir is not None else default_cache_dir()) / TINY_DIR
    if not _complete(root):
        if root.exists():
            shutil.rmtree(root)  # our own cache entry, half-written
        try:
            with atomic_directory(root) as staging:
                config = tiny_kolors_controlnet_config()
                for seed, kind in enumerate(KOLORS_KINDS, start=1):
                    model = random_init(KolorsControlNet(config), seed)
                    write_json(staging / kind / "config.json", config.to_diffusers())
                    save_file(diffsynth_to_diffusers(model), str(staging / kind / WEIGHTS_NAME), metadata={"format": "pt"})
                spec = TinyUnionSpec()
                model, prefixes = tiny_union(spec)
                save_tiny_union(staging / "union.safetensors", random_init(model, 0), prefixes, spec)
        except (OSError, FileExistsError):
            if not _complete(root):  # not just another process finishing first
                raise
    paths = {kind: root / kind for kind in KOLORS_KINDS}
    paths["union"] = root / "union.safetensors"
    return paths

