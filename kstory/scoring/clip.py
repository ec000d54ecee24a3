"""Load an open_clip model from a spec, with the activation its weights were trained with.

Specs: ``tiny`` (built offline), a local folder in open_clip's hub layout
(``open_clip_config.json`` + weights), ``NAME:PRETRAINED`` where PRETRAINED is
an open_clip tag (downloaded into open_clip's cache) or a weights file, or
``hf-hub:ORG/REPO``.

OpenAI's CLIP weights were trained with QuickGELU, but open_clip 2.29 and later
build ``ViT-L-14`` with plain GELU and only warn: the embeddings drift and
every score built on them drifts silently. So the tag's own ``quick_gelu``
setting is applied, and callers that know their weights are OpenAI's force it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.scoring.report import ModelInfo
from kstory.scoring.tiny import cached_tiny, is_tiny

_FIX = ("use 'tiny', a folder with open_clip_config.json and its weights, NAME:PRETRAINED "
        "(e.g. ViT-L-14:openai, or ViT-L-14-quickgelu:/path/weights.safetensors) or hf-hub:ORG/REPO")


@dataclass
class OpenClip:
    model: Any  # open_clip.CLIP
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    info: ModelInfo
    weight_files: list[Path]  # hashed into info.files off the critical path

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str], device: torch.device) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(device))


def _parse(spec: str | Path, cache_dir: Path | None) -> tuple[str, str | None, list[Path], str, bool]:
    """(open_clip model name, pretrained, weight files, identity, tiny) for a spec."""
    import open_clip

    text = str(spec)
    if text == "tiny":
        folder = cached_tiny("clip", cache_dir)
        return f"local-dir:{folder}", None, [folder / "open_clip_model.safetensors"], "kstory/tiny-openclip", True
    if text.startswith("hf-hub:"):
        return text, None, [], text, False
    folder = Path(text).expanduser()
    if folder.is_dir():
        if not (folder / "open_clip_config.json").is_file():
            raise KstoryError("not an open_clip model folder (no open_clip_config.json)", path=folder, fix=_FIX)
        weights = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pth"))
        return f"local-dir:{folder}", None, weights, str(folder), is_tiny(folder)
    name, sep, pretrained = text.partition(":")
    if not sep or not pretrained:
        raise KstoryError(f"open_clip model '{text}' names no weights", fix=_FIX)
    if Path(pretrained).expanduser().is_file():
        return name, str(Path(pretrained).expanduser()), [Path(pretrained).expanduser()], text, False
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        raise KstoryError(f"open_clip knows no weights '{pretrained}' for '{name}' and no such file exists",
                          fix=f"{_FIX}; open_clip.list_pretrained() lists the tags")
    try:
        path = open_clip.download_pretrained(tag_cfg, cache_dir=str(cache_dir / "open_clip") if cache_dir else None)
    except (OSError, RuntimeError, ValueError) as exc:
        raise KstoryError(f"could not download the open_clip weights {text}: {exc}",
                          fix="check the network, or give a local folder or weights file") from None
    return name, pretrained, [Path(path)], text, False


def load_open_clip(
    spec: str | Path, *, device: torch.device, cache_dir: Path | None = None, force_quick_gelu: bool = False
) -> OpenClip:
    """Load the model, its eval transform and tokenizer once, in eval mode, in float32."""
    import open_clip

    model_name, pretrained, weights, identity, tiny = _parse(spec, cache_dir)
    quick_gelu = force_quick_gelu
    if pretrained and not Path(pretrained).is_file():
        quick_gelu = quick_gelu or bool(open_clip.get_pretrained_cfg(model_name, pretrained).get("quick_gelu"))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, force_quick_gelu=quick_gelu,
            cache_dir=str(cache_dir / "open_clip") if cache_dir else None,
        )
        tokenizer = open_clip.get_tokenizer(model_name)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as exc:
        raise KstoryError(f"open_clip could not load '{spec}': {exc}", fix=_FIX) from exc
    model.eval()
    uses_quick_gelu = any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.visual.modules())
    info = ModelInfo(role="clip", form="open_clip", identity=identity, quick_gelu=uses_quick_gelu, random_weights=tiny)
    return OpenClip(model, preprocess, tokenizer, info, weights)
