"""QLoRA-style training: the frozen UNet's attention and feed-forward weights as int8 (torchao), the LoRA in float32."""

from __future__ import annotations

import hashlib
import json
import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import kstory  # noqa: F401  (before anything that imports torchvision/diffsynth)
import pytest
import torch
from safetensors.torch import load_file

from kstory.core.memory import KOLORS_COUNTS, _TABLE, estimate
from kstory.core.models.quantize import quantize_unet
from kstory.core.models.tiny import TinyKolorsSpec, tiny_unet
from kstory.core.train_settings import LATER_DEFAULTS, RESUME_FREE_FIELDS
from kstory.train import TrainSettings, train_lora
from tests.test_train import FAST, make_dataset

SETTINGS = dict(FAST, rank=4, max_steps=3, learning_rate=1e-2, mixed_precision="bf16", batch_size=2)


def test_the_default_leaves_earlier_fingerprints_as_they_were() -> None:
    """Runs made before unet_quant existed keep their digest (nothing re-trains); int8 is another LoRA."""
    settings = TrainSettings(rank=8)
    earlier = {k: v for k, v in settings.model_dump(mode="json").items()
               if k not in RESUME_FREE_FIELDS and k not in LATER_DEFAULTS}
    assert "unet_quant" in LATER_DEFAULTS
    assert settings.fingerprint() == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()
    assert TrainSettings(rank=8, unet_quant="int8").fingerprint() != settings.fingerprint()


def test_only_transformer_block_linears_become_integer() -> None:
    unet, _ = tiny_unet(TinyKolorsSpec())
    linears = {name: module for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    count = quantize_unet(unet, "int8")
    quantised = {name for name, module in linears.items() if type(module.weight).__name__ == "Int8Tensor"}
    assert count == len(quantised) > 0
    assert all(".transformer_blocks." in f".{name}" for name in quantised)
    assert set(linears) - quantised, "time/text embeddings and block projections stay in the run's dtype"


def test_int8_base_trains_a_lora_under_cpu_bf16_autocast(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data, cache = make_dataset(tmp_path / "data"), tmp_path / "cache"
    with caplog.at_level(logging.INFO, logger="kstory"):
        quantised = train_lora(data, tmp_path / "int8", TrainSettings(**SETTINGS, unet_quant="int8"), cache_dir=cache)
    assert "stored as int8" in caplog.text
    plain = train_lora(data, tmp_path / "plain", TrainSettings(**SETTINGS), cache_dir=cache)
    assert quantised.precision == "bf16" and quantised.final_loss is not None
    ours, theirs = load_file(str(quantised.lora_path)), load_file(str(plain.lora_path))
    assert ours.keys() == theirs.keys()
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in ours.values())
    # The same seeds, data and steps: only the integer base differs, so the LoRAs differ, a little.
    gaps = [(ours[k] - theirs[k]).abs().max().item() for k in ours if "lora_B" in k]
    assert max(gaps) > 0
    assert json.loads((tmp_path / "int8" / "train.json").read_text())["settings"]["unet_quant"] == "int8"


def test_the_memory_plan_counts_one_byte_for_the_quantised_share() -> None:
    half = {**_TABLE["12gb"], "device": "cuda"}
    plain = estimate(KOLORS_COUNTS, half, task="train", cached=True).work
    int8 = estimate(KOLORS_COUNTS, half, task="train", cached=True, unet_quant="int8").work
    saved = plain - int8
    assert 2.0e9 < saved < 2.3e9, saved  # 85% of 2.58 billion weights, one byte each
