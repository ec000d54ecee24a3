"""The IP-Adapter's image encoder: the vision tower of a CLIP folder, as the Kolors IP-Adapter-Plus uses it.

Kolors' ``image_encoder/`` is OpenAI CLIP ViT-L/14 at 336 px, and its weight
file holds the whole CLIP (text tower too). Only the vision tower loads, and
the adapter reads its second-to-last hidden states (``[B, 577, 1024]``). The
negative branch encodes an all-zero pixel tensor, as diffusers' and the
official Kolors pipelines do. The encoder is a phase of its own: loaded,
used on every reference, and freed before the UNet needs the memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kstory.core.errors import KstoryError

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
_FIX = "point at the image_encoder/ folder of Kwai-Kolors/Kolors-IP-Adapter-Plus (CLIP ViT-L/14, 336 px)"


@dataclass(frozen=True)
class EncoderInfo:
    """What the adapter checks against: the hidden width, the input size and where the files are."""

    folder: Path
    weights: Path
    hidden_size: int
    image_size: int
    layers: int


def _vision_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise KstoryError(f"image encoder: no readable config.json ({error})", path=folder, fix=_FIX) from error
    if config.get("model_type") == "clip":  # a whole-CLIP config: the vision tower's part
        config = dict(config.get("vision_config") or {})
    elif config.get("model_type") not in ("clip_vision_model", None):
        raise KstoryError(f"image encoder: config.json describes a {config.get('model_type')!r} model, not CLIP",
                          path=folder / "config.json", fix=_FIX)
    if not {"hidden_size", "image_size"} <= set(config):
        raise KstoryError("image encoder: config.json has no CLIP vision hidden_size/image_size",
                          path=folder / "config.json", fix=_FIX)
    return config


def inspect_encoder(folder: Path) -> EncoderInfo:
    """Read the encoder's config (no weights): refuses a folder that is not a CLIP vision model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KstoryError("image encoder folder not found", path=folder, fix=_FIX)
    config = _vision_config(folder)
    weights = next((folder / name for name in WEIGHT_NAMES if (folder / name).is_file()), None)
    if weights is None:
        raise KstoryError(f"image encoder: none of {', '.join(WEIGHT_NAMES)} in the folder", path=folder, fix=_FIX)
    return EncoderInfo(folder, weights, int(config["hidden_size"]), int(config["image_size"]),
                       int(config.get("num_hidden_layers", 0)))


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from kstory.story.adapter_files import load_pickle

    return load_pickle(path)


def load_image_encoder(folder: Path, device: str, torch_dtype: torch.dtype) -> Any:
    """transformers' ``CLIPVisionModel`` with the vision tower's weights (the rest of the file is ignored)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    info = inspect_encoder(folder)
    config = CLIPVisionConfig(**{k: v for k, v in _vision_config(info.folder).items()
                                 if k not in ("architectures", "model_type", "transformers_version")})
    state = {k: v for k, v in _read_weights(info.weights).items() if k.startswith("vision_model.")}
    model = CLIPVisionModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise KstoryError(f"image encoder: the weights do not fit its config.json (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})", path=info.weights, fix=_FIX)
    return model.to(device=device, dtype=torch_dtype).eval()


def image_processor(folder: Path) -> Any:
    """The folder's CLIPImageProcessor, or CLIP's at the encoder's input size when it ships none."""
    from transformers import CLIPImageProcessor

    folder = Path(folder)
    if (folder / "preprocessor_config.json").is_file():
        return CLIPImageProcessor.from_pretrained(str(folder))
    size = inspect_encoder(folder).image_size
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


@torch.no_grad()
def encode_references(model: Any, processor: Any, images: list[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """(second-to-last hidden states of each image, those of the all-zero input for the negative branch)."""
    parameter = next(model.parameters())
    pixels = processor(images=[image.convert("RGB") for image in images], return_tensors="pt").pixel_values
    pixels = pixels.to(device=parameter.device, dtype=parameter.dtype)
    hidden = model(pixels, output_hidden_states=True).hidden_states[-2]
    zero = model(torch.zeros_like(pixels[:1]), output_hidden_states=True).hidden_states[-2]
    return hidden, zero
