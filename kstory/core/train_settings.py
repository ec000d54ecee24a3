"""Training settings: one validated object, so a typo fails before minutes of model loading."""

from __future__ import annotations

import hashlib
import json
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kstory.core.seeds import Seed

DEFAULT_MAX_STEPS = 500  # DiffSynth's example default (1 epoch x 500 steps)
DEFAULT_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out")  # DiffSynth's SDXL UNet attention Linear names

# Settings that change which function is being learned: a checkpoint made with
# other values cannot be resumed (see train.checkpoint.check_compatible).
IDENTITY_FIELDS = ("rank", "alpha", "target_modules")
# Settings that may change between an interrupted run and its resume without
# breaking anything (more steps, other checkpoint or validation cadence).
RESUME_FREE_FIELDS = (
    "max_steps", "epochs", "checkpoint_every", "validation_every", "validation_prompts",
    "validation_steps", "validation_cfg_scale", "num_workers", "progress_bar",
    "accelerator", "devices", "strategy", "num_nodes",
)
# Settings added after runs were made, with the value every earlier run trained with: left out of the
# fingerprint and the schedule while they hold it, so earlier runs and checkpoints stay up to date.
LATER_DEFAULTS = {"num_nodes": 1, "scale_lr": False, "unet_quant": "none"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidationPrompt(_Strict):
    """A prompt rendered at fixed seed every ``validation_every`` steps to watch the style emerge."""

    prompt: str
    seed: Seed = 0
    negative_prompt: str = ""


class TrainSettings(_Strict):
    """Everything that decides what a LoRA run computes and where it runs."""

    DOC_PAGE: ClassVar[str] = "docs/train.md"

    rank: int = Field(default=4, ge=1, le=1024, description="LoRA rank r.")
    alpha: float | None = Field(default=None, gt=0, description="LoRA alpha; the update is scaled by alpha/rank. Default: rank.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        description="Names of the UNet Linear layers that get a LoRA (DiffSynth's naming).",
    )
    learning_rate: float = Field(default=1e-4, gt=0)
    scale_lr: bool = Field(default=False, description="Multiply learning_rate by the effective batch size "
                           "(batch_size x grad_accumulation x processes), like diffusers' --scale_lr.")
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(default=0, ge=0, description="Linear warm-up from 0 over this many optimizer steps.")
    weight_decay: float = Field(default=1e-2, ge=0)
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Gradient clipping; None disables it.")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps; default 500 unless epochs is set.")
    epochs: int | None = Field(default=None, ge=1, description="Passes over the dataset (instead of max_steps).")
    batch_size: int = Field(default=1, ge=1)
    grad_accumulation: int = Field(default=1, ge=1, description="Micro-batches per optimizer step.")
    resolution: int = Field(default=1024, ge=64, description="Side of the square training area in pixels (multiple of 64).")
    center_crop: bool = Field(default=False, description="Crop everything to resolution x resolution instead of aspect-ratio buckets.")
    random_flip: bool = Field(default=False, description="Flip half the samples horizontally (both latents are cached).")
    caption_dropout: float = Field(default=0.0, ge=0, lt=1, description="Probability of training on the empty caption.")
    seed: Seed = Field(default=0, description="Seed of the LoRA's initialisation, noise and timesteps (0 to 2**63-1).")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        default="auto", description="auto: bf16 on a GPU that supports it, else full float32."
    )
    gradient_checkpointing: bool = Field(default=True, description="Recompute UNet activations in backward: less memory, ~30% slower.")
    use_8bit_adam: bool = Field(default=False, description="bitsandbytes' 8-bit AdamW (must be installed).")
    unet_quant: Literal["none", "int8"] = Field(
        default="none", description="int8: the frozen UNet's attention and feed-forward weights stored as int8 "
        "(QLoRA-style, torchao: kstory[quant]); about 2 GB less at full size, the LoRA still trains in float32.")
    checkpoint_every: int = Field(default=100, ge=0, description="Save a resumable checkpoint every N steps (0: only on stop).")
    validation_every: int = Field(default=0, ge=0, description="Render validation prompts every N steps (0: only at the end).")
    validation_prompts: list[ValidationPrompt] = Field(default_factory=list)
    validation_steps: int = Field(default=20, ge=1, description="Sampling steps for validation images.")
    validation_cfg_scale: float = Field(default=5.0, ge=1.0)
    trigger_word: str | None = Field(default=None, description="Put at the front of captions that lack it; recorded in the LoRA.")
    accelerator: str = Field(default="auto", description="Lightning accelerator: auto, cpu, gpu/cuda, mps.")
    devices: int | str = Field(default="auto", description="auto (one device), a count, -1 (all), or a list like '0,1'.")
    num_nodes: int = Field(default=1, ge=1, description="Machines taking part (each starts the same command).")
    strategy: str = Field(default="auto", description="Lightning strategy: auto, ddp, fsdp, deepspeed_stage_1/2 (if installed).")
    num_workers: int = Field(default=0, ge=0, description="DataLoader workers (the cache makes loading cheap).")
    progress_bar: bool = Field(default=False, description="Show Lightning's progress bar.")

    @field_validator("resolution")
    @classmethod
    def _multiple_of_64(cls, value: int) -> int:
        if value % 64:
            raise ValueError("must be a multiple of 64 (the Kolors UNet works on 8x-downscaled latents in 8-pixel steps)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value or any(not name.strip() for name in value):
            raise ValueError("give at least one module name, e.g. to_q, to_k, to_v, to_out")
        return value

    @model_validator(mode="after")
    def _steps_or_epochs(self) -> TrainSettings:
        if self.max_steps is not None and self.epochs is not None:
            raise ValueError("set max_steps or epochs, not both")
        return self

    @property
    def lora_alpha(self) -> float:
        """alpha, defaulting to rank (a strength of 1.0)."""
        return float(self.alpha if self.alpha is not None else self.rank)

    @property
    def lora_scale(self) -> float:
        """alpha / rank: the factor on B @ A at training time."""
        return self.lora_alpha / self.rank

    def config_json(self) -> str:
        """The settings as compact, key-sorted JSON (stored in the LoRA and checkpoints)."""
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    def _recorded(self) -> dict:
        """The settings as JSON values, less the later-added ones that hold the value earlier runs had."""
        return {k: v for k, v in self.model_dump(mode="json").items() if k not in LATER_DEFAULTS or v != LATER_DEFAULTS[k]}

    def fingerprint(self, exclude: tuple[str, ...] = RESUME_FREE_FIELDS) -> str:
        """Hash of the settings that must match for an exact resume."""
        data = {k: v for k, v in self._recorded().items() if k not in exclude}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def schedule(self) -> dict:
        """The RESUME_FREE_FIELDS that are set: they continue or stop a run, never restart it."""
        recorded = self._recorded()
        return {name: recorded[name] for name in RESUME_FREE_FIELDS if name in recorded}
