"""The Lightning callback that turns optimizer steps into files: loss.csv, checkpoints, validation images.

It also owns graceful stopping: Ctrl-C (SIGINT) only sets a flag; at the end
of the current optimizer step a checkpoint is saved and training stops, so the
checkpoint holds a whole step and the resume is exact. A second Ctrl-C
interrupts at once (the checkpoint is then taken from wherever training was).
"""

from __future__ import annotations

import csv
import io
import math
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as pl
import torch

from kstory.core.atomic import write_text
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger

LOSS_HEADER = ("step", "loss", "lr")

log = get_logger("train")


class LossLog:
    """``loss.csv``: one row per optimizer step, appended and flushed as training goes."""

    def __init__(self, path: Path, keep_until: int):
        self.path = Path(path)
        self._trim(keep_until)
        self._handle = open(self.path, "a", newline="", encoding="utf-8")  # noqa: SIM115 - lives for the run
        self._writer = csv.writer(self._handle)

    def _trim(self, keep_until: int) -> None:
        """Keep the rows of steps <= keep_until (a resume drops what the checkpoint does not cover)."""
        rows = []
        if self.path.is_file():
            with open(self.path, newline="", encoding="utf-8") as handle:
                for row in csv.reader(handle):
                    try:
                        if len(row) == 3 and int(row[0]) <= keep_until:
                            rows.append(row)
                    except ValueError:
                        continue  # the header, or a line cut by a crash
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(LOSS_HEADER)
        writer.writerows(rows)
        write_text(self.path, buffer.getvalue())

    def append(self, step: int, loss: float, lr: float) -> None:
        self._writer.writerow((step, repr(loss), repr(lr)))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()


class RunRecorder(pl.Callback):
    """Per optimizer step: record the loss, and checkpoint / validate / stop when due."""

    def __init__(
        self, *, accumulation: int, checkpoint_every: int, validation_every: int, total_steps: int,
        loss_log: LossLog | None, save: Callable[[Any], Path | None], validate: Callable[[Any], Path | None] | None,
        log_every: int = 10,
    ):
        self.accumulation = accumulation
        self.checkpoint_every, self.validation_every = checkpoint_every, validation_every
        self.total_steps = total_steps
        self.loss_log = loss_log
        self.save, self.validate = save, validate
        self.log_every = log_every
        self.stop_requested = False
        self.interrupted = False
        self.last_checkpoint: Path | None = None
        self.last_loss: float | None = None
        self.started = time.monotonic()
        self._previous_handler: Any = None

    # --- Ctrl-C ----------------------------------------------------------------

    def install_signal_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGINT)
        if previous is signal.SIG_IGN:  # started with Ctrl-C ignored (a background job): keep it so
            return
        self._previous_handler = previous

        def handler(signum: int, frame: Any) -> None:
            if self.stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to stop now)")

        signal.signal(signal.SIGINT, handler)

    def restore_signal_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    # --- hooks -------------------------------------------------------------------

    def on_train_batch_end(self, trainer: pl.Trainer, module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if (batch_idx + 1) % self.accumulation:
            return
        step = module.step
        losses, module.step_losses = module.step_losses, []
        loss = sum(losses) / max(1, len(losses))
        if trainer.world_size > 1:  # the step's loss over all ranks' micro-batches
            loss = float(trainer.strategy.reduce(torch.tensor(loss, device=module.device), reduce_op="mean"))
        self.last_loss = loss
        if trainer.is_global_zero and self.loss_log is not None:
            self.loss_log.append(step, loss, module.step_lr)
        if step % self.log_every == 0 or step == self.total_steps:
            rate = (time.monotonic() - self.started) / max(1, trainer.global_step)
            log.info("step %d/%d  loss %.5f  lr %.3g  %.2fs/step", step, self.total_steps, loss, module.step_lr, rate)
        stop = trainer.strategy.reduce_boolean_decision(self.stop_requested, all=False)
        if stop or (self.checkpoint_every and step % self.checkpoint_every == 0):
            self.last_checkpoint = self.save(module) or self.last_checkpoint
        if self.validate is not None and self.validation_every and step % self.validation_every == 0 and step < self.total_steps:
            self.validate(module)
        if stop:
            self.interrupted = True
            trainer.should_stop = True
            if trainer.world_size > 1:  # no process leaves (and has a launcher kill the others) before the save
                trainer.strategy.barrier("kstory-stop")

    def on_exception(self, trainer: pl.Trainer, module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.interrupted = True
            if module.step > module.start_step and self.last_loss is not None and math.isfinite(self.last_loss):
                self.last_checkpoint = self.save(module) or self.last_checkpoint


class SameStartOnEveryRank(pl.Callback):
    """Every process must start from the same step, data position and schedule, or DDP would mix two runs.

    They differ when the output changed while the processes started (``--fresh``
    or a deleted checkpoint under torchrun, where all ranks start at once).
    """

    def __init__(self, *, start_step: int, micro_start: int, total_steps: int):
        self.position = (start_step, micro_start, total_steps)

    def on_train_start(self, trainer: pl.Trainer, module: Any) -> None:
        if trainer.world_size < 2 or not torch.distributed.is_initialized():
            return
        mine = torch.tensor(self.position, device=module.device)
        gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, mine)
        every = [row.tolist() for row in gathered]
        if any(row != every[0] for row in every):
            raise KstoryError(
                "the training processes start from different places (step, micro-step, total steps by rank: "
                f"{every}): the output folder changed while they started",
                fix="start every process on the same output; to start over, delete or move the output folder "
                "before launching (not --fresh under torchrun or SLURM)",
            )
