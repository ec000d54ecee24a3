"""What to change when a training phase runs out of memory: only the knobs not already at their low-memory value.

A message that tells someone to turn on gradient checkpointing when it is on
sends them in a circle; each list here is built from the run's own settings
and memory plan, largest saving first, so every item would lower the need.
"""

from __future__ import annotations

import torch

from kstory.core.memory import MemoryPlan
from kstory.core.train_settings import TrainSettings
from kstory.train.runtime import Runtime

_SMALLER_GPU_PROFILE = {"none": "24gb", "24gb": "16gb", "16gb": "12gb", "12gb": "8gb"}
_RESUME = "then run the same command again: it resumes from the last checkpoint"
_NOTHING_LEFT = "every memory setting is already at its lowest: use a machine with more memory"


def _smaller_profile(plan: MemoryPlan | None) -> str | None:
    if plan is None:
        return "a memory profile (--memory auto picks one for this machine)"
    if plan.device == "cpu":
        return None if plan.profile == "cpu" else "--memory cpu (bfloat16 weights, ChatGLM streamed)"
    smaller = _SMALLER_GPU_PROFILE.get(plan.profile)
    return f"a smaller memory profile (--memory {smaller} or 8gb)" if smaller else None


def training_memory_fix(settings: TrainSettings, plan: MemoryPlan | None) -> str:
    """The knobs that lower a training step's memory, for this run."""
    checkpointing = settings.gradient_checkpointing or bool(plan and plan.gradient_checkpointing)
    knobs = [
        _smaller_profile(plan),
        None if checkpointing else "gradient_checkpointing: true",
        None if settings.batch_size == 1 else (f"batch_size: 1 with grad_accumulation: "
                                               f"{settings.batch_size * settings.grad_accumulation} (the same "
                                               f"effective batch)"),
        None if settings.unet_quant != "none" else "unet_quant: int8",
        None if settings.use_8bit_adam or (plan is not None and plan.device != "cuda")
        else "use_8bit_adam: true (CUDA)",
        None if settings.resolution <= 512 else f"a lower resolution (now {settings.resolution})",
    ]
    chosen = [knob for knob in knobs if knob]
    return f"use {'; '.join(chosen)}; {_RESUME}" if chosen else _NOTHING_LEFT


def caching_memory_fix(settings: TrainSettings, runtime: Runtime) -> str:
    """The knobs that lower the memory of encoding captions (ChatGLM) and images (the VAE) for the cache."""
    streamed_profiles = "cpu" if runtime.device.type == "cpu" else "12gb or 8gb"
    knobs = [
        None if runtime.text_streamed else f"--memory {streamed_profiles} (ChatGLM read and run one block at a time)",
        None if runtime.text_quant != "none" else "--text-encoder-quant int8",
        None if settings.resolution <= 512 else f"a lower resolution (now {settings.resolution})",
    ]
    chosen = [knob for knob in knobs if knob]
    return f"use {'; '.join(chosen)}" if chosen else _NOTHING_LEFT


def unet_load_memory_fix(settings: TrainSettings, runtime: Runtime) -> str:
    """The knobs that lower the memory of loading the base UNet."""
    knobs = [
        None if runtime.weight_dtype != torch.float32 else
        f"half-precision weights (--memory {'cpu' if runtime.device.type == 'cpu' else 'auto'}, or "
        f"mixed_precision: bf16)",
        None if settings.unet_quant != "none" else
        "unet_quant: int8 (the base UNet loads with its attention and feed-forward weights at one byte)",
    ]
    chosen = [knob for knob in knobs if knob]
    return f"use {'; '.join(chosen)}" if chosen else _NOTHING_LEFT
