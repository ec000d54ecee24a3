"""LoRA files: the one place that reads, writes and merges kstory LoRAs (docs/train.md, "The LoRA file").

Training writes them, the story stage merges them into the pipeline, and the
package exports and checks them; all three come here, so the format and its
metadata have one definition. Training-only helpers (injecting LoRA layers
into a UNet for training) stay in ``kstory.train.lora_io``.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kstory.core.atomic import atomic_path
from kstory.core.errors import KstoryError

FORMAT = "kstory-lora/1"
ADAPTER = "default"
_FIX = "use a lora.safetensors written by 'kstory train'"

# safetensors metadata keys (all values are strings).
META_FORMAT = "format"  # always "pt" (what safetensors tools expect)
META_KSTORY_FORMAT = "kstory.format"
META_RANK = "kstory.rank"
META_ALPHA = "kstory.alpha"
META_DIFFSYNTH_ALPHA = "kstory.diffsynth_lora_alpha"
META_TARGETS = "kstory.target_modules"
META_BASE = "kstory.base_model"
META_FINGERPRINT = "kstory.base_fingerprint"
META_TRIGGER = "kstory.trigger_word"
META_CONFIG = "kstory.training_config"
META_VERSION = "kstory.version"
META_STEP = "kstory.step"
META_WORLD_SIZE = "kstory.world_size"  # training processes (devices x machines)
META_EFFECTIVE_BATCH = "kstory.effective_batch_size"  # batch_size x grad_accumulation x world_size
META_LEARNING_RATE = "kstory.learning_rate"  # the base learning rate the optimizer used
META_LR_SCALE = "kstory.lr_scale"  # learning_rate / training_config's learning_rate (scale_lr: the effective batch)


def build_metadata(
    *, rank: int, alpha: float, target_modules: list[str], base_model: str, base_fingerprint: str,
    trigger_word: str | None, training_config: str, step: int, batch: Mapping[str, int | float] | None = None,
) -> dict[str, str]:
    """The documented metadata block (docs/train.md); safetensors stores strings only.

    ``batch``: ``world_size``, ``effective_batch_size``, ``learning_rate`` and ``lr_scale`` of the training run.
    """
    from kstory import __version__

    recorded = {} if batch is None else {
        META_WORLD_SIZE: str(int(batch["world_size"])),
        META_EFFECTIVE_BATCH: str(int(batch["effective_batch_size"])),
        META_LEARNING_RATE: repr(float(batch["learning_rate"])),
        META_LR_SCALE: repr(float(batch["lr_scale"])),
    }
    return {
        META_FORMAT: "pt",
        META_KSTORY_FORMAT: FORMAT,
        META_RANK: str(rank),
        META_ALPHA: repr(float(alpha)),
        META_DIFFSYNTH_ALPHA: repr(float(alpha) / rank),
        META_TARGETS: ",".join(target_modules),
        META_BASE: base_model,
        META_FINGERPRINT: base_fingerprint,
        META_TRIGGER: trigger_word or "",
        META_CONFIG: training_config,
        META_VERSION: __version__,
        META_STEP: str(step),
        **recorded,
    }


def save_lora(path: Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> Path:
    """Write the LoRA atomically (a crash leaves the previous file, never a truncated one)."""
    with atomic_path(path) as tmp:
        save_file(dict(state), str(tmp), metadata=dict(metadata))
    return Path(path)


def read_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a kstory LoRA; KstoryError for anything else (pickles included)."""
    path = Path(path)
    if not path.is_file():
        raise KstoryError("LoRA file not found", path=path, fix=_FIX)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise KstoryError(f"not a readable safetensors LoRA ({error})", path=path, fix=_FIX) from error
    if metadata.get(META_KSTORY_FORMAT) != FORMAT:
        raise KstoryError(
            f"not a {FORMAT} file (format: {metadata.get(META_KSTORY_FORMAT, 'none')})", path=path, fix=_FIX
        )
    return state, metadata


def lora_strength(metadata: Mapping[str, str], scale: float | None = None) -> float:
    """alpha / rank * scale: the factor DiffSynth must put on B @ A (scale 1.0 = training strength)."""
    rank, alpha = int(metadata[META_RANK]), float(metadata[META_ALPHA])
    return alpha / rank * (1.0 if scale is None else float(scale))


def load_lora_into_pipeline(pipe: Any, lora_path: Path, scale: float | None = None) -> dict[str, Any]:
    """Merge a kstory LoRA into ``pipe.unet`` with DiffSynth's own peft-format loader.

    Applies exactly ``alpha / rank * scale`` (scale defaults to 1.0, the strength
    the LoRA was trained at), so the merged UNet reproduces the training-time
    model. Merging changes the weights in place: load a LoRA once per pipeline.
    Returns the metadata plus the applied ``strength``.
    """
    from diffsynth.models.lora import GeneralLoRAFromPeft

    state, metadata = read_lora(lora_path)
    loader = GeneralLoRAFromPeft()
    if loader.match(pipe.unet, state) is None:
        raise KstoryError(
            f"this LoRA does not fit the pipeline's UNet (trained on {metadata.get(META_BASE) or 'another model'})",
            path=lora_path, fix="load it into a pipeline built from the base model it was trained on",
        )
    strength = lora_strength(metadata, scale)
    with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth prints "N tensors are updated."
        loader.load(pipe.unet, state, alpha=strength)
    return {**metadata, "strength": strength, "training_config": json.loads(metadata.get(META_CONFIG) or "{}")}


def is_kstory_lora(path: Path) -> bool:
    """Whether ``path`` is a LoRA written by ``kstory train`` (reads the header only; False for anything else)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return (handle.metadata() or {}).get(META_KSTORY_FORMAT) == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False
