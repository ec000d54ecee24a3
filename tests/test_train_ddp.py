"""Two-process DDP training on the CPU (gloo), launched as a user does: `kstory train` with devices 2, strategy ddp.

Lightning's launcher re-runs the command for rank 1. One optimizer step of the
two processes takes two consecutive micro-batches, so the run must match a
single process with grad_accumulation 2 step for step, across a real Ctrl-C
and the resume that follows.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as pl
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from kstory.core.lora import META_EFFECTIVE_BATCH, META_LEARNING_RATE, META_LR_SCALE, META_STEP, META_WORLD_SIZE
from kstory.train import TrainSettings, train_lora
from kstory.train.checkpoint import list_checkpoints
from tests.test_train import make_dataset

STEPS = 4
SETTINGS = dict(resolution=64, gradient_checkpointing=False, batch_size=1, max_steps=STEPS, learning_rate=1e-3,
                seed=7, accelerator="cpu")


def _losses(path: Path) -> list[tuple[int, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [(int(row["step"]), float(row["loss"])) for row in csv.DictReader(handle)]


def _complete_rows(path: Path) -> int:
    """Rows of a loss.csv being written, the header and a half-written line left out."""
    try:
        return max(0, path.read_text(encoding="utf-8").count("\n") - 1)
    except FileNotFoundError:
        return 0


def _train_cli(data: Path, out: Path, settings: Path) -> list[str]:
    return [sys.executable, "-m", "kstory.cli", "train", str(data), "--out", str(out), "--settings", str(settings)]


@pytest.mark.slow
def test_two_process_ddp_interrupted_and_resumed_matches_one_process(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", seed=20)  # pictures no other test caches: rank 0 must encode them
    settings_file = tmp_path / "train.yaml"
    settings_file.write_text(yaml.safe_dump({**SETTINGS, "devices": 2, "strategy": "ddp", "checkpoint_every": 1}))
    lora_dir = tmp_path / "run" / "lora"  # inside a run folder: the run's lock and log are rank 0's alone
    command = _train_cli(data, lora_dir, settings_file)
    # A shell that starts this suite in the background leaves SIGINT ignored in its children; a user's Ctrl-C is not.
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and first.poll() is None:
        if _complete_rows(lora_dir / "loss.csv"):  # rank 0 has recorded step 1
            break
        time.sleep(0.02)
    assert first.poll() is None, "the training finished before it could be interrupted"
    first.send_signal(signal.SIGINT)  # to rank 0 only: the ranks agree to stop at the end of the step
    _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err
    assert "Traceback" not in err
    # Stopped at a step boundary: a checkpoint for every step trained (checkpoint_every 1), the last one the
    # last step loss.csv recorded, holding that step's LoRA; no final LoRA yet.
    checkpoints = list_checkpoints(lora_dir)
    stopped = checkpoints[-1][0]
    assert stopped < STEPS and not (lora_dir / "lora.safetensors").exists()
    assert [step for step, _ in checkpoints] == list(range(1, stopped + 1))
    assert [step for step, _ in _losses(lora_dir / "loss.csv")] == list(range(1, stopped + 1))
    with safe_open(str(checkpoints[-1][1] / "lora.safetensors"), framework="pt") as handle:
        assert (handle.metadata()[META_STEP], handle.metadata()[META_WORLD_SIZE]) == (str(stopped), "2")
    # The cache was encoded once, by rank 0 before rank 1 started; rank 1 found it complete.
    encoded = [line for line in err.splitlines() if "to encode" in line]
    assert len(encoded) == 1 and not encoded[0].startswith("[rank 1]")
    assert "[rank 1] every caption and image is cached" in err

    second = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert second.returncode == 0, second.stderr
    assert "[rank 1] resuming from" in second.stderr

    summary = json.loads((lora_dir / "train.json").read_text())
    assert (summary["resumed_from"], summary["steps"], summary["world_size"]) == (stopped, STEPS, 2)
    assert summary["effective_batch_size"] == 2
    assert [path.relative_to(lora_dir).as_posix() for path in lora_dir.rglob("lora.safetensors")
            if "checkpoints" not in path.parts] == ["lora.safetensors"]
    with safe_open(str(lora_dir / "lora.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta[META_WORLD_SIZE], meta[META_EFFECTIVE_BATCH], meta[META_STEP]) == ("2", "2", str(STEPS))
    assert float(meta[META_LEARNING_RATE]) == SETTINGS["learning_rate"] and float(meta[META_LR_SCALE]) == 1.0
    log = (tmp_path / "run" / "kstory.log").read_text(encoding="utf-8")
    assert log.count("effective batch 2") == 2  # once per command: rank 1 writes nothing to the run's log
    assert not (tmp_path / "run" / ".lock.json").exists()

    # One process with grad_accumulation 2 takes the same micro-batches in the same order.
    single = TrainSettings(**SETTINGS, grad_accumulation=2, checkpoint_every=0)
    reference = train_lora(data, tmp_path / "single", single, model="tiny")
    ddp_losses, single_losses = _losses(lora_dir / "loss.csv"), _losses(tmp_path / "single" / "loss.csv")
    assert [step for step, _ in ddp_losses] == list(range(1, STEPS + 1))  # one row per step, none from rank 1
    assert [step for step, _ in single_losses] == list(range(1, STEPS + 1))
    for (_, a), (_, b) in zip(ddp_losses, single_losses, strict=True):
        assert a == pytest.approx(b, rel=1e-5), (ddp_losses, single_losses)
    ddp, one = load_file(str(lora_dir / "lora.safetensors")), load_file(str(reference.lora_path))
    assert ddp.keys() == one.keys()
    assert all(torch.allclose(ddp[k], one[k], rtol=1e-4, atol=1e-6) for k in ddp)
    assert any(not torch.equal(ddp[k], torch.zeros_like(ddp[k])) for k in ddp if "lora_B" in k)  # it trained


class _MicroSteps(pl.Callback):
    """Records the micro-step of every batch a process trains on."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append(int(batch["micro_step"]))


def test_scale_lr_trains_at_the_scaled_rate_and_a_resume_continues_at_the_checkpoints_micro_step(tmp_path: Path):
    data = make_dataset(tmp_path / "data")
    base = dict(resolution=64, gradient_checkpointing=False, batch_size=2, learning_rate=1e-4, accelerator="cpu")
    first = _MicroSteps()
    train_lora(data, tmp_path / "out", TrainSettings(**base, grad_accumulation=2, max_steps=1, scale_lr=True),
               model="tiny", callbacks=[first])
    assert first.seen == [0, 1]
    assert _rates(tmp_path / "out" / "loss.csv") == [pytest.approx(4e-4)]  # 1e-4 x (2 x 2 x 1 process)
    with safe_open(str(tmp_path / "out" / "lora.safetensors"), framework="pt") as handle:
        meta = handle.metadata()
    assert (meta[META_WORLD_SIZE], meta[META_EFFECTIVE_BATCH]) == ("1", "4")
    assert float(meta[META_LR_SCALE]) == 4.0 and float(meta[META_LEARNING_RATE]) == pytest.approx(4e-4)

    # Fewer micro-batches per step now (as with fewer processes): the data goes on from micro-step 2, none replayed.
    second = _MicroSteps()
    train_lora(data, tmp_path / "out", TrainSettings(**base, grad_accumulation=1, max_steps=3, scale_lr=True),
               model="tiny", callbacks=[second])
    assert second.seen == [2, 3]
    state = json.loads((tmp_path / "out" / "checkpoints" / "step-000003" / "state.json").read_text())
    assert state["micro_step"] == 4


def _rates(path: Path) -> list[float]:
    with open(path, newline="", encoding="utf-8") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]
