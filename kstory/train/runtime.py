"""Where and how a run computes: accelerator, precision and weight dtype, checked before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kstory.core.errors import KstoryError
from kstory.core.memory import MemoryPlan
from kstory.core.ranks import local_rank
from kstory.core.train_settings import TrainSettings

_PRECISION = {"no": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}
_HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Runtime:
    """The resolved accelerator/precision for this process."""

    accelerator: str  # "gpu", "cpu" or "mps" (Lightning's names)
    precision: str  # "no" / "bf16" / "fp16"
    weight_dtype: torch.dtype  # frozen base weights: half with bf16/fp16 mixed precision (CPU included)
    device: torch.device  # where this process trains (and encodes the cache)
    text_device: torch.device | None = None  # where ChatGLM encodes captions, when not ``device``
    text_quant: str = "none"  # ChatGLM's linear weights: none, int8 or int4
    text_streamed: bool = False  # ChatGLM read and run one block at a time (the same numbers)

    @property
    def text_encoder_device(self) -> torch.device:
        return self.text_device or self.device

    @property
    def text_encoder_dtype(self) -> torch.dtype:
        """ChatGLM's dtype: the weights' dtype, but bf16 for half precision on a CPU (fp16 matmuls are slow there)."""
        if self.text_encoder_device.type == "cpu" and self.weight_dtype == torch.float16:
            return torch.bfloat16
        return self.weight_dtype

    @property
    def cache_tag(self) -> str:
        """Part of the cache folder name beyond the weights' dtype: captions encoded elsewhere differ in the last bits."""
        quant = "" if self.text_quant == "none" else f"-text-{self.text_quant}"
        if self.text_encoder_device.type == self.device.type:
            return quant
        return f"-text-{self.text_encoder_device.type}-{str(self.text_encoder_dtype).removeprefix('torch.')}{quant}"

    @property
    def lightning_precision(self) -> str:
        return _PRECISION[self.precision]

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _HALF.get(self.precision)


def _require(module: str, problem: str, fix: str) -> None:
    try:
        __import__(module)
    except ImportError as error:
        raise KstoryError(problem, fix=fix) from error


def resolve_runtime(settings: TrainSettings, memory: MemoryPlan | None = None) -> Runtime:
    """Pick accelerator and precision up front, with KstoryErrors for what cannot work on this machine.

    A ``memory`` profile with half-precision weights turns ``mixed_precision: auto`` into bf16 (fp16 on a
    GPU without bf16), and may encode captions on the CPU.
    """
    wanted = settings.accelerator.lower()
    if wanted not in ("auto", "gpu", "cuda", "cpu", "mps"):
        raise KstoryError(f"unknown accelerator {settings.accelerator!r}", fix="use auto, cpu, gpu or mps")
    cuda = torch.cuda.is_available()
    if wanted in ("gpu", "cuda") and not cuda:
        raise KstoryError(f"accelerator {settings.accelerator!r} asked for, but no CUDA GPU is visible",
                          fix="set accelerator: auto (or cpu)")
    if wanted in ("gpu", "cuda") or (wanted == "auto" and cuda):
        accelerator = "gpu"
    elif wanted == "mps" or (wanted == "auto" and torch.backends.mps.is_available()):
        accelerator = "mps"
    else:
        accelerator = "cpu"
    precision = settings.mixed_precision
    half = memory is not None and memory.half
    if precision == "auto":
        if accelerator == "gpu":
            precision = "bf16" if torch.cuda.is_bf16_supported() else ("fp16" if half else "no")
        else:
            precision = "bf16" if half and accelerator == "cpu" else "no"
    if half and precision == "no":
        raise KstoryError(f"memory profile {memory.profile} keeps the base weights in half precision, "
                          "but mixed_precision is no", fix="set mixed_precision: auto or bf16, or memory: none")
    if precision == "fp16" and accelerator != "gpu":
        raise KstoryError("fp16 mixed precision needs a CUDA GPU", fix="use mixed_precision: bf16 or no")
    if settings.use_8bit_adam:
        _require("bitsandbytes", "use_8bit_adam needs bitsandbytes, which is not installed",
                 "pip install bitsandbytes (CUDA only), or set use_8bit_adam: false")
    if settings.unet_quant != "none":
        _require("torchao", f"unet_quant {settings.unet_quant} needs torchao, which is not installed",
                 'pip install "kstory[quant]" (torchao), or set unet_quant: none')
    from kstory.train.distributed import check_distributed

    check_distributed(settings, accelerator)
    if settings.strategy.startswith("deepspeed"):
        _require("deepspeed", f"strategy {settings.strategy!r} needs deepspeed, which is not installed",
                 "pip install deepspeed, or use strategy: auto / ddp")
    # Half-precision weights wherever the hardware has them; DiffSynth's fp16 files are converted at load,
    # since fp16 weights fail under CPU bf16 autocast ("mixed dtype (CPU)").
    weight_dtype = _HALF[precision] if accelerator in ("gpu", "cpu") and precision in _HALF else torch.float32
    if accelerator == "gpu":
        device = torch.device("cuda", local_rank())
    else:
        device = torch.device(accelerator)
    text_device = torch.device("cpu") if memory is not None and memory.text_encoder_device == "cpu" else None
    text_quant = memory.text_encoder_quant if memory is not None else "none"
    return Runtime(accelerator, precision, weight_dtype, device, text_device, text_quant,
                   bool(memory is not None and memory.text_encoder_streamed))
