"""Memory profiles: how a run fits Kolors into the memory this machine has.

A profile decides the weights' dtype, where ChatGLM encodes and whether it
stays loaded beside the UNet, how many frames share a batch, tiled VAE
decoding and gradient checkpointing. ``auto`` picks one from the free device
memory (free GPU memory, or available RAM on the CPU) and says why. Needs are
estimated from the weight files' sizes, so a run that cannot fit is refused
before anything loads, naming the profile that would fit.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError

PROFILES = ("auto", "none", "24gb", "16gb", "12gb", "8gb", "cpu")
GPU_PROFILES = ("24gb", "16gb", "12gb", "8gb")  # largest first
GiB = 1 << 30
_BUDGET = {"24gb": 22 * GiB, "16gb": 14.5 * GiB, "12gb": 10.8 * GiB, "8gb": 7.2 * GiB}
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Rough activation costs at 1024x1024 (scaled by pixel area): per frame denoised (CFG pair) in half
# precision, the untiled VAE decode in float32, and a training step with/without gradient checkpointing.
_DENOISE_PER_FRAME = 1.0 * GiB
_VAE_DECODE = 3.0 * GiB
_VAE_DECODE_TILED = 0.5 * GiB
_TRAIN_STEP = {True: 3.0 * GiB, False: 10.0 * GiB}
# Profiles whose story holds only the ControlNets of the batch being denoised (kstory.story.generate.Session).
PER_BATCH_CONTROLNET_PROFILES = ("12gb", "8gb", "cpu")
_STREAMED_SHARE = 0.1  # ChatGLM streamed block by block: the token embedding and one of 28 blocks resident


@dataclass(frozen=True)
class MemoryPlan:
    """What a profile decides; recorded in train.json and the story manifest (``as_record``)."""

    profile: str  # the profile in effect: none, 24gb, 16gb, 12gb, 8gb or cpu
    requested: str  # what was asked for (auto or a profile)
    reason: str
    device: str  # "cuda" or "cpu"
    half: bool  # weights in half precision (bf16 on the CPU, fp16/bf16 on a GPU)
    keep_text_encoder: bool  # ChatGLM stays loaded beside the UNet (faster re-encodes); else freed first
    text_encoder_device: str  # "device" (where the UNet runs) or "cpu"
    max_batch: int | None  # cap on frames denoised together
    tiled_vae: bool  # decode frames in tiles (DiffSynth's tiled VAE decoder): less memory, other pixels
    gradient_checkpointing: bool | None  # None: the training settings decide
    text_encoder_quant: str = "none"  # ChatGLM's linear weights: none, int8 or int4 (torchao)
    text_encoder_streamed: bool = False  # ChatGLM read and run one block at a time (same numbers, ~1 GB)

    def as_record(self) -> dict[str, Any]:
        return asdict(self)


_TABLE: dict[str, dict[str, Any]] = {
    "none": dict(half=False, keep_text_encoder=False, text_encoder_device="device", max_batch=None,
                 tiled_vae=False, gradient_checkpointing=None, text_encoder_streamed=False),
    "24gb": dict(half=True, keep_text_encoder=True, text_encoder_device="device", max_batch=4,
                 tiled_vae=False, gradient_checkpointing=None, text_encoder_streamed=False),
    "16gb": dict(half=True, keep_text_encoder=False, text_encoder_device="device", max_batch=2,
                 tiled_vae=False, gradient_checkpointing=True, text_encoder_streamed=False),
    "12gb": dict(half=True, keep_text_encoder=False, text_encoder_device="cpu", max_batch=1,
                 tiled_vae=True, gradient_checkpointing=True, text_encoder_streamed=True),
    "8gb": dict(half=True, keep_text_encoder=False, text_encoder_device="cpu", max_batch=1,
                tiled_vae=True, gradient_checkpointing=True, text_encoder_streamed=True),
    "cpu": dict(half=True, keep_text_encoder=False, text_encoder_device="device", max_batch=1,
                tiled_vae=True, gradient_checkpointing=True, text_encoder_streamed=True),
}


def _row(profile: str) -> dict[str, Any]:
    """A profile's settings as the estimate reads them (what it decides, and whether ControlNets go per batch)."""
    return {**_TABLE[profile], "controlnets_per_batch": profile in PER_BATCH_CONTROLNET_PROFILES}


def _numel_safetensors(path: Path) -> int | None:
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


def parameter_count(path: Path) -> int:
    """Parameters in a weight file or folder: exact for safetensors, file size / 2 (half) otherwise."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = 0
    for file in files:
        if file.suffix == ".safetensors":
            total += _numel_safetensors(file) or file.stat().st_size // 2
        elif file.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            total += file.stat().st_size // 2
    return total


# Parameters of the published Kwai-Kolors/Kolors networks, for plans made without the weights at hand.
KOLORS_COUNTS = {"text_encoder": 6_243_584_000, "unet": 2_580_000_000, "vae": 83_653_863}


def weight_counts(weights: Any) -> dict[str, int]:
    """Parameters per network of ``KolorsWeights`` (or a dict like :data:`KOLORS_COUNTS`, returned as is)."""
    if isinstance(weights, dict):
        return weights
    return {part: parameter_count(getattr(weights, part)) for part in ("text_encoder", "unet", "vae")}


def _itemsize(half: bool) -> int:
    return 2 if half else 4


@dataclass(frozen=True)
class Need:
    """Estimated peak bytes of one run under one profile, by phase."""

    encode: int
    work: int  # denoising + decoding, or training
    together: bool  # ChatGLM stays loaded: the phases add up

    @property
    def peak(self) -> int:
        return self.encode + self.work if self.together else max(self.encode, self.work)


def estimate(weights: Any, table: dict[str, Any], *, task: str, pixels: int = 1024 * 1024, frames: int = 1,
             controlnets: list[Path] = (), gradient_checkpointing: bool = True, cached: bool = False,
             unet_quant: str = "none", frame_controlnets: list[list[Path]] | None = None) -> Need:
    """Peak memory of ``task`` ("story" or "train") on ``weights`` with one profile's settings.

    ``frame_controlnets`` (the ControlNets of each frame) lets a profile that holds one batch's ControlNets at
    a time (``table["controlnets_per_batch"]``, one frame per batch) count the most any frame uses, not them all.
    """
    item = _itemsize(table["half"])
    te_on_device = table["text_encoder_device"] == "device"
    counts = weight_counts(weights)
    # Integer ChatGLM weights are made from half-precision ones after loading, so they save device memory
    # (loaded on the CPU, quantised, then moved), not host memory.
    quantised_on_gpu = table.get("text_encoder_quant", "none") != "none" and table.get("device") == "cuda"
    text = counts["text_encoder"] * (1 if quantised_on_gpu else item)
    if table.get("text_encoder_streamed"):
        text = int(text * _STREAMED_SHARE)
    vae = counts["vae"] * 4  # DiffSynth runs the SDXL VAE in float32 whatever the dtype
    unet = counts["unet"] * item
    if unet_quant == "int8":  # the transformer blocks' Linear weights at one byte each
        from kstory.core.models.quantize import UNET_QUANTISED_SHARE

        unet -= int(counts["unet"] * UNET_QUANTISED_SHARE * (item - 1))
    scale = pixels / (1024 * 1024)
    if task == "train":
        encode = 0 if cached else (text if te_on_device else 0) + vae
        work = unet + int(_TRAIN_STEP[gradient_checkpointing] * scale * frames)
    else:
        encode = text if te_on_device else 0
        sizes = {Path(p): parameter_count(p) * item for p in controlnets}
        nets = sum(sizes.values())
        if table.get("controlnets_per_batch") and frame_controlnets is not None:
            nets = max((sum(sizes.get(Path(p)) or parameter_count(p) * item for p in set(map(Path, used)))
                        for used in frame_controlnets), default=0)
        decode = _VAE_DECODE_TILED if table["tiled_vae"] else _VAE_DECODE * scale
        work = unet + nets + vae // 2 + int(_DENOISE_PER_FRAME * scale * frames * (1 if table["half"] else 2) + decode)
    return Need(encode, work, table["keep_text_encoder"] and te_on_device)


def free_models(*modules: Any) -> None:
    """Give big models' memory back: storage moved to 'meta' (even if a reference survives), gc, CUDA cache."""
    import gc

    for module in modules:
        if isinstance(module, torch.nn.Module):
            module.to("meta")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def free_memory(device: str) -> int:
    """Free GPU memory (CUDA) or available RAM (CPU), in bytes."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def gib(value: float) -> str:
    return f"{value / GiB:.1f} GiB"


def plan_memory(requested: str, weights: Any, *, task: str, device: str | None = None,
                text_encoder_device: str | None = None, text_encoder_quant: str = "none", **need: Any) -> MemoryPlan:
    """Resolve ``requested`` to a profile for ``task`` on this machine; refuse what cannot fit.

    ``text_encoder_device="cpu"`` encodes on the CPU whatever the profile says; ``text_encoder_quant``
    (int8, int4) stores ChatGLM's linear weights as integers, which the estimate counts.
    ``need`` is passed to :func:`estimate` (pixels, frames, controlnets, gradient_checkpointing, cached, unet_quant).
    """
    if text_encoder_device not in (None, "auto", "device", "cpu"):
        raise KstoryError(f"unknown text_encoder_device {text_encoder_device!r}", fix="use auto or cpu")
    from kstory.core.models.quantize import check_quant_mode

    check_quant_mode(text_encoder_quant)
    if requested not in PROFILES:
        raise KstoryError(f"unknown memory profile {requested!r}", fix=f"use one of: {', '.join(PROFILES)}")
    cuda = torch.cuda.is_available()
    if device is None:
        device = "cpu" if requested == "cpu" or not cuda else "cuda"
    device = torch.device(device).type
    if requested in GPU_PROFILES and device != "cuda":
        raise KstoryError(f"memory profile {requested} is for a CUDA GPU, and this run is on the {device}",
                          fix="use memory: cpu (or auto)")
    if requested == "cpu" and device != "cpu":
        raise KstoryError("memory profile cpu runs on the CPU, but this run is on the GPU",
                          fix="use memory: auto or a GPU profile (24gb, 16gb, 12gb, 8gb)")
    free = free_memory(device)
    weights = weight_counts(weights)  # read the files' headers once
    if requested == "auto":
        profile, reason = _auto(weights, task, device, free, need)
    else:
        profile, reason = requested, f"asked for ({gib(free)} free on the {device})"
    table = dict(_TABLE[profile])
    if text_encoder_device == "cpu":
        table["text_encoder_device"] = "cpu"
    table["text_encoder_quant"] = text_encoder_quant
    if text_encoder_quant != "none" and device == "cuda" and text_encoder_device != "cpu":
        table["text_encoder_device"] = "device"  # integer ChatGLM (6 GB at int8) encodes on the GPU in any profile
    needed = estimate(weights, {**_row(profile), **table, "device": device}, task=task, **need).peak
    budget = _BUDGET.get(profile, free)
    if needed > budget:
        raise KstoryError(
            f"memory profile {profile} cannot fit this {task}: it needs about {gib(needed)}, "
            f"{'the profile allows ' + gib(budget) if profile in _BUDGET else gib(free) + ' is available'}",
            fix=_what_fits(weights, task, device, free, need),
        )
    return MemoryPlan(profile=profile, requested=requested, reason=reason, device=device, **table)


def _auto(weights: Any, task: str, device: str, free: int, need: dict[str, Any]) -> tuple[str, str]:
    if device == "cpu":
        full = estimate(weights, _row("none"), task=task, **need).peak
        if full <= free * 0.9:
            return "none", f"float32 needs about {gib(full)} and {gib(free)} of RAM is available"
        return "cpu", f"float32 would need about {gib(full)}, only {gib(free)} of RAM is available: bfloat16"
    for profile in GPU_PROFILES:
        if free >= _BUDGET[profile]:
            return profile, f"{gib(free)} free on the GPU"
    return "8gb", f"only {gib(free)} free on the GPU (the smallest profile)"


def _what_fits(weights: Any, task: str, device: str, free: int, need: dict[str, Any]) -> str:
    options = GPU_PROFILES if device == "cuda" else ("none", "cpu")
    fitting = [p for p in options if estimate(weights, _row(p), task=task, **need).peak <= _BUDGET.get(p, free * 0.9)]
    if fitting:
        name = fitting[-1] if device == "cuda" else fitting[0]
        return f"use memory: {name}" + (" (a GPU with that much free memory)" if device == "cuda" else "")
    return "use a machine with more memory, smaller frames or batches, or fewer ControlNets"


def describe(plan: MemoryPlan, task: str | None = None) -> str:
    """One log line: the profile, why, and what it decides (for ``task``: "train", "story" or both)."""
    parts = [f"memory profile {plan.profile}" + (f" (auto: {plan.reason})" if plan.requested == "auto" else ""),
             f"{'half' if plan.half else 'full'}-precision weights",
             "ChatGLM kept loaded" if plan.keep_text_encoder else "ChatGLM freed before the UNet loads",
             f"text encoder on the {'CPU' if plan.text_encoder_device == 'cpu' else plan.device}"
             + (f" with {plan.text_encoder_quant} weights" if plan.text_encoder_quant != "none" else "")
             + (", one block at a time" if plan.text_encoder_streamed else "")]
    if plan.max_batch and task != "train":
        parts.append(f"at most {plan.max_batch} frame(s) per batch")
    if plan.tiled_vae and task != "train":
        parts.append("tiled VAE decode")
    if plan.gradient_checkpointing and task != "story":
        parts.append("gradient checkpointing")
    return ", ".join(parts)


def doctor_lines() -> list[str]:
    """What ``auto`` picks on this machine for the full Kolors at 1024 px (story: 4 frames; train: batch 1)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [f"free memory  {gib(free_memory(device))} on the {device}"]
    for task, frames in (("train", 1), ("story", 4)):
        try:
            plan = plan_memory("auto", KOLORS_COUNTS, task=task, device=device, frames=frames)
            need = estimate(KOLORS_COUNTS, _row(plan.profile), task=task, frames=frames).peak
            lines.append(f"{task:<12} {describe(plan, task)}; needs about {gib(need)}")
        except KstoryError as error:
            lines.append(f"{task:<12} {error.message}; {error.fix}")
    return lines
