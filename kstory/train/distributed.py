"""The multi-device settings (``train.devices``, ``train.strategy``): what the Trainer gets, and checks before any model loads.

Lightning would fail on these only after the caption cache is built, or hang
waiting for processes that never start; each is refused here with the setting
named and the fix.
"""

from __future__ import annotations

import os

import torch

from kstory.core.errors import KstoryError
from kstory.core.train_settings import TrainSettings

STRATEGIES = ("auto", "ddp", "fsdp")  # and deepspeed_stage_1/2/3, checked for the package


def lightning_devices(settings: TrainSettings) -> int | str:
    """What the Trainer gets for ``train.devices``: ``auto`` is one device.

    Lightning's own ``auto`` takes every GPU, and with several it re-runs the
    command line once per extra GPU; kstory trains on several devices only when
    asked for (a count, ``-1`` for all, or a list).
    """
    return 1 if str(settings.devices).strip().lower() == "auto" else settings.devices


def available_devices(accelerator: str) -> int:
    """How many devices of this kind this machine has: GPUs, or CPU cores (one process each)."""
    if accelerator == "gpu":
        return torch.cuda.device_count()
    if accelerator == "mps":
        return 1
    return os.cpu_count() or 1


def requested_devices(devices: int | str) -> int | None:
    """The number of devices ``devices`` names (a count, or ``0,1``: a list); None for ``-1`` (all) and ``auto``."""
    if isinstance(devices, int):
        return None if devices == -1 else devices
    text = str(devices).strip().lower()
    if text in ("auto", "-1"):
        return None
    if text.isdigit():
        return int(text)
    return len([part for part in text.split(",") if part.strip()])


def check_distributed(settings: TrainSettings, accelerator: str) -> None:
    """Refuse device counts this machine does not have and strategies its accelerator cannot run."""
    strategy = settings.strategy.lower()
    if strategy == "ddp_spawn":
        raise KstoryError("train.strategy ddp_spawn is not supported: it pickles the trainer into new processes and "
                          "copies the whole UNet back to this one", fix="use train.strategy: ddp (the same "
                          "training, with each process started from the command line)")
    if strategy not in STRATEGIES and not strategy.startswith("deepspeed"):
        raise KstoryError(f"train.strategy is {settings.strategy!r}, which kstory does not run",
                          fix="set train.strategy to auto, ddp, fsdp (GPUs) or deepspeed_stage_1/2")
    if strategy == "fsdp" and accelerator != "gpu":
        raise KstoryError(f"train.strategy fsdp needs CUDA GPUs; this run trains on the {accelerator}",
                          fix="use train.strategy: ddp (or auto) on the CPU, or train on GPUs")
    wanted = requested_devices(settings.devices)
    if wanted is not None and wanted < 1:
        raise KstoryError(f"train.devices is {settings.devices!r}: give at least 1",
                          fix="set train.devices to auto, a count like 2, or a list like '0,1'")
    have = available_devices(accelerator)
    if wanted is not None and wanted > have:
        kind = {"gpu": "GPU(s)", "mps": "MPS device"}.get(accelerator, "CPU core(s)")
        raise KstoryError(f"train.devices asks for {wanted} device(s), but this machine has {have} {kind}",
                          fix=f"set train.devices to {have} or fewer (or auto); several machines: "
                          "train.num_nodes with torchrun or SLURM (docs/scale-out.md)")
    per_machine = 1 if lightning_devices(settings) == 1 else (wanted if wanted is not None else have)
    _check_launched_world(settings, per_machine)


def _check_launched_world(settings: TrainSettings, devices: int) -> None:
    """Under torchrun every process is already running: the settings must make as many, or each would train alone.

    With ``devices: auto`` (one device) under ``torchrun --nproc_per_node 2``,
    Lightning would run two unrelated one-process trainings into the same output.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launched, world = int(os.environ.get("WORLD_SIZE", "1") or 1), devices * settings.num_nodes
    if launched != world:
        raise KstoryError(f"torchrun started {launched} processes, but train.devices x train.num_nodes make {world}",
                          fix="set train.devices to --nproc_per_node and train.num_nodes to --nnodes "
                          "(docs/scale-out.md)")
