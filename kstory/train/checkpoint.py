"""Resumable checkpoints with no pickles: tensors in safetensors, everything else in JSON.

Layout of ``checkpoints/step-XXXXXX/`` (built in a staging folder and renamed
into place, so a folder that exists is complete)::

    lora.safetensors        the LoRA at this step (same format as the final one)
    optimizer.safetensors   optimizer state tensors, key "state.<param index>.<name>"
    optimizer.json          param groups, non-tensor state, and the parameter names by index
    rng.safetensors         torch CPU / CUDA generator states
    state.json              step, identity (base model, rank, alpha, targets, settings hash),
                            lr scheduler, grad scaler, python/numpy RNG states
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kstory.core.atomic import atomic_directory
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.train.lora_io import load_lora_state, read_lora, save_lora

STATE_FORMAT = 1
_NAME = re.compile(r"^step-(\d{6,})$")

log = get_logger("train")


def checkpoint_dir(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step-{step:06d}"


def list_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (staging folders never match the name pattern)."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for path in root.glob("step-*") if root.is_dir() else []:
        match = _NAME.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1][1] if found else None


# --- optimizer ----------------------------------------------------------------


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = tensor
    for index, entry in data["scalars"].items():
        state.setdefault(int(index), {}).update(entry)
    groups = []
    for group in data["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


# --- RNG ------------------------------------------------------------------------


def _rng_to_files() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def _restore_rng(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> None:
    torch.random.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = data["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- save / load ------------------------------------------------------------------


def _scaler(trainer: Any) -> Any:
    plugin = getattr(trainer, "precision_plugin", None) or getattr(trainer.strategy, "precision_plugin", None)
    return getattr(plugin, "scaler", None)


def _scheduler_state(lr_scheduler: Any) -> dict[str, Any] | None:
    """The schedule's position; its shape (kind, warm-up, total) comes from the settings, so a resume
    with more steps follows the new schedule."""
    if lr_scheduler is None:
        return None
    state = lr_scheduler.state_dict()
    if "lr_lambdas" in state:
        state["lr_lambdas"] = [None] * len(state["lr_lambdas"])
    return state


def save_checkpoint(
    out_dir: Path, *, step: int, micro_step: int, lora_state: dict[str, torch.Tensor], lora_metadata: dict[str, str],
    optimizer: torch.optim.Optimizer | None, lr_scheduler: Any, trainer: Any, identity: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step-XXXXXX`` atomically; an existing one for the same step is kept."""
    target = checkpoint_dir(out_dir, step)
    if (target / "state.json").is_file():
        return target
    if target.exists():  # left by a crash of an older kstory between rename and state.json: not trusted
        shutil.rmtree(target)
    scaler = _scaler(trainer)
    rng_tensors, rng_data = _rng_to_files()
    state = {
        "format": STATE_FORMAT,
        "step": step,
        "micro_step": micro_step,
        "identity": identity,
        "lr_scheduler": _scheduler_state(lr_scheduler),
        "grad_scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_data,
        "optimizer_saved": False,
    }
    with atomic_directory(target) as staging:
        save_lora(staging / "lora.safetensors", lora_state, lora_metadata)
        if optimizer is not None and isinstance(optimizer, torch.optim.Optimizer):
            tensors, data = _optimizer_to_files(optimizer)
            save_file(tensors, str(staging / "optimizer.safetensors"))
            (staging / "optimizer.json").write_text(json.dumps(data), encoding="utf-8")
            state["optimizer_saved"] = True
        save_file(rng_tensors, str(staging / "rng.safetensors"))
        (staging / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")  # last: marks complete
    return target


@dataclass
class Checkpoint:
    """A loaded checkpoint: what a resumed run needs to continue exactly."""

    path: Path
    state: dict[str, Any]
    lora: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    rng_tensors: dict[str, torch.Tensor]
    optimizer_names: list[str] | None = None

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def micro_step(self) -> int:
        return int(self.state["micro_step"])

    @property
    def identity(self) -> dict[str, Any]:
        return self.state["identity"]

    def apply_lora(self, unet: torch.nn.Module) -> None:
        load_lora_state(unet, self.lora)

    def apply_training_state(self, trainer: Any, module: Any) -> None:
        """Optimizer, LR schedule, grad scaler and RNG states, once Lightning has built the optimizer."""
        optimizer = trainer.optimizers[0]
        if self.optimizer is not None:
            names = [n for n, _ in module.trainable_parameters()]
            if names != self.optimizer_names:
                raise KstoryError(
                    "the checkpoint's optimizer state is for other parameters", path=self.path,
                    fix=_FRESH_FIX,
                )
            optimizer.load_state_dict(self.optimizer)
        else:
            log.warning("checkpoint %s has no optimizer state: optimizer moments restart from zero", self.path.name)
        if self.state.get("lr_scheduler") and module.lr_scheduler is not None:
            module.lr_scheduler.load_state_dict(self.state["lr_scheduler"])
        scaler = _scaler(trainer)
        if scaler is not None and self.state.get("grad_scaler"):
            scaler.load_state_dict(self.state["grad_scaler"])
        _restore_rng(self.rng_tensors, self.state["rng"])


def load_checkpoint(path: Path) -> Checkpoint:
    """Read a checkpoint folder (KstoryError naming the file if any part is damaged)."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
        lora, _ = read_lora(path / "lora.safetensors")
        optimizer, names = None, None
        if state.get("optimizer_saved"):
            data = json.loads((path / "optimizer.json").read_text(encoding="utf-8"))
            optimizer = _optimizer_from_files(load_file(str(path / "optimizer.safetensors")), data)
            names = state["identity"].get("parameter_names")
        rng = load_file(str(path / "rng.safetensors"))
    except KstoryError:
        raise
    except Exception as error:  # noqa: BLE001 - JSON, safetensors and OS errors all mean "damaged"
        raise KstoryError(f"cannot read checkpoint: {error}", path=path, fix=_FRESH_FIX) from error
    if state.get("format") != STATE_FORMAT:
        raise KstoryError(f"checkpoint format {state.get('format')} is not {STATE_FORMAT}", path=path, fix=_FRESH_FIX)
    return Checkpoint(path, state, lora, optimizer, rng, names)


_FRESH_FIX = "start fresh: delete the output's checkpoints/ folder, or run without resume (--fresh)"


def check_compatible(checkpoint: Checkpoint, identity: dict[str, Any]) -> list[str]:
    """Refuse a checkpoint from another base model, rank, alpha or targets; return warnings for softer changes.

    Soft keys (settings, data, world size) are compared only when ``identity`` has them, so the hard
    check can run before any model is loaded.
    """
    saved = checkpoint.identity
    for key, label in (
        ("base_fingerprint", "base model"), ("rank", "LoRA rank"), ("alpha", "LoRA alpha"),
        ("target_modules", "LoRA target modules"),
    ):
        if saved.get(key) != identity.get(key):
            old, new = saved.get(key), identity.get(key)
            if key == "base_fingerprint":
                old = f"{saved.get('base_model')} ({str(old)[:12]})"
                new = f"{identity.get('base_model')} ({str(new)[:12]})"
            raise KstoryError(
                f"cannot resume: the checkpoint was trained with {label} {old}, this run uses {new}",
                path=checkpoint.path, fix=_FRESH_FIX,
            )
    warnings = []
    for key, what in (("settings_fingerprint", "training settings"), ("data_fingerprint", "the dataset")):
        if key in identity and saved.get(key) != identity[key]:
            warnings.append(f"{what} changed since the checkpoint; the resumed run will not match an uninterrupted one")
    if "world_size" in identity and saved.get("world_size", 1) != identity["world_size"]:
        warnings.append(f"the checkpoint was trained by {saved.get('world_size', 1)} process(es), this run has "
                        f"{identity['world_size']}: it continues from the checkpoint's micro-batch with another "
                        "effective batch, so it will not match an uninterrupted run")
    return warnings
