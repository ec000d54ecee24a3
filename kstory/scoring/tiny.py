"""Random-weight models in the published on-disk formats, for tests, the demo and the benchmark.

No weights can be downloaded offline, yet the scorer must be exercised through
exactly the loading code the real models go through. So the builders write:

* an aesthetic predictor folder laid out like
  ``AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``
  (``config.json`` naming ``AestheticsPredictorV2Linear``, one weights file with
  the CLIP vision tower and the ``layers.*`` MLP head, the CLIP preprocessor and
  a tokenizer, so the organisers' ``CLIPProcessor.from_pretrained`` loads it);
* an open_clip folder laid out like the ``timm/*`` open_clip repositories
  (``open_clip_config.json`` + ``open_clip_model.safetensors``), loadable with
  open_clip's ``local-dir:`` schema.

Their scores mean nothing: the weights are random.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models import default_cache_dir

TINY_AESTHETIC_DIR = "tiny-aesthetic-v1"
TINY_CLIP_DIR = "tiny-openclip-v1"
TINY_MARKER = "kstory_tiny.json"  # present in every folder built here: its scores mean nothing
AESTHETIC_ARCHITECTURE = "AestheticsPredictorV2Linear"
AESTHETIC_WEIGHTS = "model.safetensors"
HEAD_WIDTHS = (1024, 128, 64, 16, 1)  # the MLP of AestheticsPredictorV2Linear after the projection
HEAD_LAYER_INDICES = (0, 2, 4, 6, 7)  # positions of the Linear layers in its nn.Sequential (Dropouts between)
TINY_HEAD_BIAS = 6.0  # centres random scores on the default gate so the demo shows both outcomes
TINY_HEAD_GAIN = 2.5  # default-initialised, the 5 layers shrink the spread of scores to ~0.002: too flat to test

# The CLIP ViT-L/14 vision tower of openai/clip-vit-large-patch14, used by the published predictor.
VIT_L14_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
)
TINY_VISION = dict(
    hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    image_size=224, patch_size=32, projection_dim=16, hidden_act="quick_gelu",
    initializer_factor=2.0,  # larger random weights: distinct embeddings, and GELU vs QuickGELU shows
)
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def aesthetic_head(projection_dim: int) -> torch.nn.Sequential:
    """The predictor's MLP with the published module indices (so its keys are ``layers.0`` ... ``layers.7``)."""
    widths = (projection_dim, *HEAD_WIDTHS)
    modules: list[torch.nn.Module] = []
    for i, index in enumerate(HEAD_LAYER_INDICES):
        while len(modules) < index:
            modules.append(torch.nn.Identity())  # where the published head has Dropout (a no-op at inference)
        modules.append(torch.nn.Linear(widths[i], widths[i + 1]))
    return torch.nn.Sequential(*modules)


def write_aesthetic_model(
    folder: Path, vision: dict[str, Any], *, seed: int = 0, head_bias: float = 0.0, head_gain: float = 1.0
) -> Path:
    """Write a random-weight predictor of the published format with the given CLIP vision config.

    ``head_gain`` scales the random MLP weights, so that scores of different images differ visibly.
    """
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(**vision)
    tower = CLIPVisionModelWithProjection(config).eval()
    head = aesthetic_head(config.projection_dim)
    with torch.no_grad():
        for index in HEAD_LAYER_INDICES:
            head[index].weight.mul_(head_gain)
        head[HEAD_LAYER_INDICES[-1]].bias.fill_(head_bias)
    tensors = {k: v.contiguous() for k, v in tower.state_dict().items()}
    tensors.update({f"layers.{k}": v.contiguous() for k, v in head.state_dict().items()})
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / AESTHETIC_WEIGHTS, metadata={"format": "pt"})
    config.architectures = [AESTHETIC_ARCHITECTURE]
    config.save_pretrained(folder)
    CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=_byte_tokenizer(folder)).save_pretrained(folder)
    return folder


def _byte_tokenizer(folder: Path):
    """A CLIP tokenizer with one token per byte: the published folder ships one, the scorer never uses it."""
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [f"{s}</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(vocab_file), str(merges_file))


def build_tiny_aesthetic_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny predictor (a 2-layer CLIP, 16-d embedding) into ``folder``."""
    folder = Path(folder)
    write_aesthetic_model(folder, TINY_VISION, seed=seed, head_bias=TINY_HEAD_BIAS, head_gain=TINY_HEAD_GAIN)
    write_json(folder / TINY_MARKER, {"kind": "aesthetic", "seed": seed, "note": "random weights: scores mean nothing"})
    return folder


def write_open_clip_model(folder: Path, model_cfg: dict[str, Any], *, seed: int = 0) -> Path:
    """Write a random-weight open_clip model as ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**model_cfg).eval()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    write_json(folder / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": {}})
    return folder


def build_tiny_clip_model(folder: Path, seed: int = 0) -> Path:
    """Write the tiny open_clip model used for coherence and prompt fit offline."""
    folder = Path(folder)
    write_open_clip_model(folder, TINY_OPEN_CLIP, seed=seed)
    write_json(folder / TINY_MARKER, {"kind": "open_clip", "seed": seed, "note": "random weights: scores mean nothing"})
    return folder


def cached_tiny(kind: str, cache_dir: Path | None = None) -> Path:
    """The tiny ``aesthetic`` or ``clip`` model in the cache, built on first use."""
    name, build = {"aesthetic": (TINY_AESTHETIC_DIR, build_tiny_aesthetic_model),
                   "clip": (TINY_CLIP_DIR, build_tiny_clip_model)}[kind]
    target = (cache_dir or default_cache_dir()) / name
    if (target / TINY_MARKER).is_file():
        return target
    try:
        with atomic_directory(target) as staging:
            build(staging)
    except FileExistsError:  # built meanwhile by another process
        pass
    return target


def is_tiny(folder: Path) -> bool:
    return (Path(folder) / TINY_MARKER).is_file()
