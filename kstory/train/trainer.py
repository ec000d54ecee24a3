"""``train_lora``: from a prepared dataset to ``lora.safetensors``, resumable at any step.

Order matters for memory: the text encoder and VAE encode the whole dataset
into the on-disk cache first and are then freed (train.prepare), so only the
UNet with its LoRA (plus the small VAE decoder, parked on the CPU, when
validation images are wanted) is in memory while training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from kstory.core.atomic import write_json
from kstory.core.errors import KstoryError
from kstory.core.oserrors import os_fault
from kstory.core.out_of_memory import first_line, is_out_of_memory
from kstory.train.memory_advice import training_memory_fix
from kstory.core.logs import get_logger
from kstory.core.train_settings import DEFAULT_MAX_STEPS, TrainSettings

log = get_logger("train")

OUTPUTS = ("lora.safetensors", "loss.csv", "train.json", "checkpoints", "validation")


@dataclass(frozen=True)
class TrainResult:
    """What a finished run produced (also written to ``train.json``)."""

    out_dir: Path
    lora_path: Path
    steps: int
    resumed_from: int
    final_loss: float | None
    seconds: float
    last_checkpoint: Path | None
    validation_dir: Path | None
    device: str
    precision: str
    peak_vram_bytes: int | None
    memory: dict[str, Any] | None = None  # the memory profile in effect (kstory.core.memory.MemoryPlan.as_record)
    world_size: int = 1  # training processes (devices x machines)
    effective_batch_size: int | None = None  # batch_size x grad_accumulation x world_size
    learning_rate: float | None = None  # the base learning rate the optimizer used (scale_lr included)


def total_steps(settings: TrainSettings, batches_per_epoch: int, world_size: int = 1) -> int:
    """Optimizer steps of the whole run: max_steps, or epochs over the bucketed batches.

    One optimizer step takes grad_accumulation micro-batches on each of the ``world_size`` processes.
    """
    if settings.max_steps is not None:
        return settings.max_steps
    if settings.epochs is not None:
        return max(1, math.ceil(batches_per_epoch * settings.epochs / (settings.grad_accumulation * world_size)))
    return DEFAULT_MAX_STEPS


def batch_record(settings: TrainSettings, world_size: int) -> dict[str, float]:
    """World size, effective batch, learning-rate factor and rate of a run on ``world_size`` processes.

    ``scale_lr`` multiplies the learning rate by the effective batch, as diffusers' ``--scale_lr`` does.
    """
    effective = settings.batch_size * settings.grad_accumulation * world_size
    scale = float(effective) if settings.scale_lr else 1.0
    return {"world_size": world_size, "effective_batch_size": effective, "lr_scale": scale,
            "learning_rate": settings.learning_rate * scale}


def _checkpoint_batch(settings: TrainSettings, checkpoint: Any, current: dict[str, float]) -> dict[str, float]:
    """The record of the run that made a checkpoint exported without training (its world size and rate)."""
    record = batch_record(settings, int(checkpoint.identity.get("world_size", current["world_size"])))
    base_lrs = (checkpoint.state.get("lr_scheduler") or {}).get("base_lrs")
    if base_lrs:
        record.update(learning_rate=float(base_lrs[0]), lr_scale=float(base_lrs[0]) / settings.learning_rate)
    return record


def _clear_outputs(out_dir: Path) -> None:
    for name in OUTPUTS:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _data_fingerprint(cache: Any) -> str:
    digest = hashlib.sha256()
    for sample in cache.samples:
        digest.update(f"{sample.latent.name}:{sample.text.name}\n".encode())
    return digest.hexdigest()


def _rank_sampler(dataset: Any, trainer: Any) -> Any:
    """This rank's items of the StepDataset: r, r + world, r + 2 world, ... (all of them on one process).

    One optimizer step of the world then takes the grad_accumulation x world
    micro-steps that follow the last one, in order, as one process with that
    much accumulation would. Lightning's own DistributedSampler shuffles the
    items of a training loader, so the trainer is told not to add one.
    """
    if trainer.world_size == 1:
        return torch.utils.data.SequentialSampler(dataset)
    return torch.utils.data.DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                               shuffle=False, drop_last=False)


def _make_trainer(settings: TrainSettings, runtime: Any, out_dir: Path) -> Any:
    """The Lightning Trainer: one epoch over the StepDataset, which holds exactly the steps still to train."""
    import lightning as pl

    from kstory.train.distributed import lightning_devices

    try:
        with _quiet_lightning(not settings.progress_bar):
            return pl.Trainer(
                accelerator=runtime.accelerator, devices=lightning_devices(settings), num_nodes=settings.num_nodes,
                strategy=settings.strategy, precision=runtime.lightning_precision, max_epochs=1, max_steps=-1,
                accumulate_grad_batches=settings.grad_accumulation, gradient_clip_val=settings.max_grad_norm,
                logger=False, enable_checkpointing=False, enable_progress_bar=settings.progress_bar,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(out_dir),
                use_distributed_sampler=False,  # _rank_sampler shards the micro-steps in order
            )
    except Exception as error:  # Lightning raises MisconfigurationException and others for bad device setups
        raise KstoryError(f"cannot set up training on this machine: {error}",
                          fix="check accelerator / devices / num_nodes / strategy in the train settings") from error


@contextlib.contextmanager
def _quiet_lightning(quiet: bool):
    """Lightning logs device banners and tips at INFO; kstory logs its own progress."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [logger.level for logger in loggers]
    if quiet:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


class _Outputs:
    """Writes the LoRA, checkpoints and validation images of one run (global rank 0 only)."""

    def __init__(self, out_dir: Path, settings: TrainSettings, weights: Any, identity: dict[str, Any],
                 prepared: Any, runtime: Any, resumed: Any):
        self.out_dir, self.settings, self.weights, self.identity = out_dir, settings, weights, identity
        self.prepared, self.runtime, self.resumed = prepared, runtime, resumed
        self.trainer: Any = None
        self.module: Any = None
        self.micro_start = 0  # the micro-step this invocation started at
        self.batch: dict[str, float] = {}  # batch_record of the run
        self.texts = {**prepared.cache.validation_texts, "": prepared.cache.empty_text}

    def metadata(self, step: int) -> dict[str, str]:
        from kstory.train.lora_io import build_metadata

        s = self.settings
        return build_metadata(
            rank=s.rank, alpha=s.lora_alpha, target_modules=list(s.target_modules), base_model=self.weights.identity,
            base_fingerprint=self.weights.fingerprint, trigger_word=s.trigger_word, training_config=s.config_json(),
            step=step, batch={**self.batch, "learning_rate": self.learning_rate(),
                              "lr_scale": self.learning_rate() / s.learning_rate},
        )

    def learning_rate(self) -> float:
        """The base rate the optimizer used: a resumed schedule keeps its checkpoint's, whatever scale_lr says now."""
        scheduler = getattr(self.module, "lr_scheduler", None)
        return float(scheduler.base_lrs[0]) if scheduler is not None else float(self.batch["learning_rate"])

    def finite_lora(self, step: int) -> dict[str, torch.Tensor]:
        """The LoRA factors, refusing NaN/inf so no file is ever written from broken weights."""
        from kstory.train.lora_io import lora_state_dict
        from kstory.train.module import NonFiniteLoss

        state = lora_state_dict(self.prepared.unet)
        if not all(torch.isfinite(t).all() for t in state.values()):
            raise NonFiniteLoss(step, float("nan"))
        return state

    def save_checkpoint(self, module: Any) -> Path | None:
        from kstory.train.checkpoint import save_checkpoint

        if not self.trainer.is_global_zero:
            return None
        step = module.step
        if self.resumed is not None and step <= self.resumed.step:
            return self.resumed.path
        sharded = self.settings.strategy.startswith("deepspeed") or not self.trainer.optimizers
        world = self.trainer.world_size
        micro_step = self.micro_start + (step - module.start_step) * self.settings.grad_accumulation * world
        try:
            return save_checkpoint(
                self.out_dir, step=step, micro_step=micro_step,
                lora_state=self.finite_lora(step), lora_metadata=self.metadata(step),
                optimizer=None if sharded else self.trainer.optimizers[0],  # DeepSpeed shards optimizer state
                lr_scheduler=module.lr_scheduler, trainer=self.trainer, identity={**self.identity, "world_size": world},
            )
        except (OSError, SafetensorError, KstoryError) as error:  # safetensors reports a failed write as its own type
            action = f"could not save the checkpoint for step {step}"
            fault = os_fault(error, self.out_dir / "checkpoints", action=action)
            if fault is None and isinstance(error, KstoryError):
                raise
            then = "training resumes from the last complete checkpoint"
            raise KstoryError(
                fault.message if fault else f"{action}: {error}", path=self.out_dir / "checkpoints",
                fix=f"{fault.fix}; {then}" if fault else f"free disk space (or fix permissions) and run again; {then}",
            ) from error

    def validate(self, module: Any) -> Path | None:
        from kstory.train.validation import render_validation

        s = self.settings
        if not self.trainer.is_global_zero or not s.validation_prompts:
            return None
        unet = self.prepared.unet
        return render_validation(
            self.out_dir, module.step, unet, self.prepared.vae_decoder, s.validation_prompts, self.texts,
            resolution=s.resolution, steps=s.validation_steps, cfg_scale=s.validation_cfg_scale,
            device=next(unet.parameters()).device, autocast_dtype=self.runtime.autocast_dtype,
        )


def train_lora(
    data_dir: Path, out_dir: Path, settings: TrainSettings, *, model: str = "tiny", cache_dir: Path | None = None,
    resume: bool = True, callbacks: list[Any] | None = None, memory: str = "auto",
    text_encoder_device: str = "auto", text_encoder_quant: str = "none",
) -> TrainResult:
    """Train a Kolors LoRA on ``data_dir`` (prep's output) into ``out_dir``.

    ``resume=True`` continues from the newest complete checkpoint in
    ``out_dir/checkpoints`` (refusing one from another base model or rank);
    ``resume=False`` deletes earlier outputs there and starts over. Extra
    Lightning ``callbacks`` are appended to the trainer's. Ctrl-C saves a
    checkpoint at the end of the current step and re-raises KeyboardInterrupt
    (on global rank 0; the other processes of a multi-device run return).
    ``memory`` is a profile of :mod:`kstory.core.memory` (``auto`` picks one from the free memory);
    ``text_encoder_device="cpu"`` encodes the captions on the CPU whatever the profile says;
    ``text_encoder_quant`` (int8, int4) quantises ChatGLM's linear weights (its captions get their own cache).
    """
    from kstory.core.models import resolve_model
    from kstory.core.models.resolve import default_cache_dir
    from kstory.train.batches import BatchPlan, StepDataset
    from kstory.train.callbacks import LossLog, RunRecorder, SameStartOnEveryRank
    from kstory.train.checkpoint import check_compatible, latest_checkpoint, load_checkpoint
    from kstory.train.dataset import read_samples
    from kstory.train.lora_io import inject_lora, save_lora
    from kstory.train.module import KolorsLoraModule, NonFiniteLoss
    from kstory.train.prepare import prepare
    from kstory.train.runtime import resolve_runtime
    from kstory.train.validation import kolors_scheduler
    from kstory.core.memory import describe
    from kstory.core.ranks import secondary_rank

    started = time.monotonic()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    samples = read_samples(data_dir, settings.trigger_word)  # bad data fails before any model loads
    runtime = resolve_runtime(settings)
    weights = resolve_model(model, cache_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not resume and not secondary_rank():
        _clear_outputs(out_dir)
    identity = {
        "base_model": weights.identity, "base_fingerprint": weights.fingerprint, "rank": settings.rank,
        "alpha": settings.lora_alpha, "target_modules": list(settings.target_modules),
        "settings_fingerprint": settings.fingerprint(),
    }
    resumed = None
    if resume and (found := latest_checkpoint(out_dir)) is not None:
        resumed = load_checkpoint(found)
        check_compatible(resumed, identity)  # refuse before minutes of model loading
        if (done := _already_finished(out_dir, settings, resumed, started)) is not None:
            return done

    # 1. cache every caption and image, free the encoders; then load the UNet.
    memory_plan = _memory_plan(memory, weights, settings, runtime, text_encoder_device, text_encoder_quant)
    if memory_plan is not None:
        runtime = resolve_runtime(settings, memory_plan)
        log.info("%s", describe(memory_plan, "train"))
    prepared = prepare(weights, samples, settings, runtime,
                       (Path(cache_dir) if cache_dir else default_cache_dir()) / "train-cache")
    cache, unet = prepared.cache, prepared.unet

    # 2. trainer, LoRA, resume state and Lightning module.
    trainer = _make_trainer(settings, runtime, out_dir)
    world = trainer.world_size
    plan = BatchPlan(cache.samples, settings.batch_size, settings.seed)
    steps_total = total_steps(settings, plan.batches_per_epoch, world)
    identity["data_fingerprint"] = _data_fingerprint(cache)
    identity["world_size"] = world
    with warnings.catch_warnings():  # peft: an int8 base cannot merge the LoRA; kstory saves the factors, never merges
        warnings.filterwarnings("ignore", message=".*TorchaoLoraLinear.*")
        identity["parameter_names"] = inject_lora(unet, settings.rank, settings.lora_alpha, settings.target_modules,
                                                  settings.seed)
    if resumed is not None and resumed.step > steps_total:
        resumed = _checkpoint_within(out_dir, resumed, steps_total)
    start_step, micro_start = 0, 0
    if resumed is not None:
        for warning in check_compatible(resumed, identity):
            log.warning(warning)
        resumed.apply_lora(unet)
        start_step, micro_start = resumed.step, resumed.micro_step  # micro-steps: right with another world size too
        log.info("resuming from %s (step %d of %d)", resumed.path, start_step, steps_total)
    batch = batch_record(settings, world)
    log.info("effective batch %d (batch_size %d x grad_accumulation %d x %d process(es)); learning rate %.3g%s",
             batch["effective_batch_size"], settings.batch_size, settings.grad_accumulation, world,
             batch["learning_rate"], f" (scale_lr: {settings.learning_rate:.3g} x {batch['lr_scale']:g})"
             if settings.scale_lr else "")
    kept = _checkpoint_batch(settings, resumed, batch)["learning_rate"] if resumed is not None else None
    if kept is not None and kept != batch["learning_rate"]:
        log.warning("the checkpoint's learning rate %.3g goes on (its optimizer and schedule are restored), not %.3g",
                    kept, batch["learning_rate"])
    scheduler = kolors_scheduler()
    scheduler.set_timesteps(scheduler.num_train_timesteps)  # the 1100 training timesteps, as DiffSynth's example
    module = KolorsLoraModule(
        unet, settings, alphas_cumprod=torch.tensor(scheduler.alphas_cumprod, dtype=torch.float64),
        timesteps=scheduler.timesteps, prediction_type=scheduler.prediction_type, total_steps=steps_total,
        start_step=start_step, learning_rate=batch["learning_rate"],
    )
    module.restore = resumed
    if memory_plan is not None and memory_plan.gradient_checkpointing:
        module.gradient_checkpointing = True
    module.train()  # DiffSynth hands models over in eval mode
    remaining = steps_total - start_step
    outputs = _Outputs(out_dir, settings, weights, identity, prepared, runtime, resumed)
    outputs.trainer, outputs.module, outputs.micro_start = trainer, module, micro_start
    outputs.batch = batch if remaining > 0 or resumed is None else _checkpoint_batch(settings, resumed, batch)
    loss_log = LossLog(out_dir / "loss.csv", keep_until=start_step) if trainer.is_global_zero else None
    recorder = RunRecorder(
        accumulation=settings.grad_accumulation, checkpoint_every=settings.checkpoint_every,
        validation_every=settings.validation_every, total_steps=steps_total, loss_log=loss_log,
        save=outputs.save_checkpoint, validate=outputs.validate if settings.validation_prompts else None,
    )
    same_start = SameStartOnEveryRank(start_step=start_step, micro_start=micro_start, total_steps=steps_total)
    trainer.callbacks.extend([same_start, recorder, *(callbacks or [])])

    # 3. train.
    final_step = start_step
    if remaining > 0:
        micro_per_step = settings.grad_accumulation * world
        dataset = StepDataset(
            cache, plan, start=micro_start, length=remaining * micro_per_step,
            num_train_timesteps=len(scheduler.timesteps), random_flip=settings.random_flip,
            caption_dropout=settings.caption_dropout, seed=settings.seed,
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, sampler=_rank_sampler(dataset, trainer),
                                             num_workers=settings.num_workers)
        log.info("training %d step(s) (%d..%d) on %d image(s) in %d bucket(s), %s, %s precision", remaining,
                 start_step + 1, steps_total, len(samples), len(plan.groups), runtime.accelerator, runtime.precision)
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        recorder.install_signal_handler()
        try:
            with warnings.catch_warnings(), _quiet_lightning(not settings.progress_bar):
                warnings.filterwarnings("ignore", message=".*does not have many workers.*")
                warnings.filterwarnings("ignore", message=".*LeafSpec.*")
                trainer.fit(module, train_dataloaders=loader)
        except NonFiniteLoss as error:
            raise KstoryError(
                f"training stopped: {error} (not finite); {_last_checkpoint_said(out_dir, 'last good')}",
                fix="lower learning_rate, use mixed_precision bf16 or no instead of fp16, check the data; "
                    "run again to resume from the last good checkpoint, or start fresh",
            ) from error
        except RuntimeError as error:
            if not is_out_of_memory(error):
                raise
            raise KstoryError(
                f"ran out of memory training, {module.step} step(s) done ({settings.resolution} px, batch_size "
                f"{settings.batch_size}): {first_line(error)}; {_last_checkpoint_said(out_dir)}",
                fix=training_memory_fix(settings, memory_plan)) from error
        except SystemExit as error:  # Lightning turns a KeyboardInterrupt into sys.exit(1)
            if recorder.interrupted:
                raise KeyboardInterrupt from error
            raise
        finally:
            recorder.restore_signal_handler()
        if recorder.interrupted and trainer.is_global_zero:
            log.warning("stopped at step %d; checkpoint: %s; run again to resume", module.step, recorder.last_checkpoint)
            raise KeyboardInterrupt
        # The other ranks return: a launcher that sees one exit with an error kills the rest, rank 0 included.
        final_step = module.step
    else:
        log.info("nothing to train: the checkpoint is already at step %d of %d", start_step, steps_total)
    if loss_log is not None:
        loss_log.close()

    # 4. outputs: final checkpoint (so a longer run can continue), LoRA, validation, summary.
    last_checkpoint = recorder.last_checkpoint or (resumed.path if resumed is not None else None)
    validation_dir = None
    lora_path = out_dir / "lora.safetensors"
    if trainer.is_global_zero:
        if remaining > 0:
            last_checkpoint = outputs.save_checkpoint(module)
        save_lora(lora_path, outputs.finite_lora(final_step), outputs.metadata(final_step))
        if settings.validation_prompts and remaining > 0:
            unet.to(runtime.device)  # Lightning's teardown parks the model on the CPU
            validation_dir = outputs.validate(module)
    result = TrainResult(
        out_dir=out_dir, lora_path=lora_path, steps=final_step, resumed_from=start_step,
        final_loss=recorder.last_loss if recorder.last_loss is not None else _logged_loss(out_dir / "loss.csv", final_step),
        seconds=time.monotonic() - started, last_checkpoint=last_checkpoint,
        validation_dir=validation_dir, device=str(runtime.device), precision=runtime.precision,
        peak_vram_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        memory=memory_plan.as_record() if memory_plan is not None else None,
        world_size=int(outputs.batch["world_size"]), effective_batch_size=int(outputs.batch["effective_batch_size"]),
        learning_rate=outputs.learning_rate(),
    )
    if trainer.is_global_zero:
        _write_summary(out_dir / "train.json", result, settings, weights, cache, steps_total)
    return result


def _memory_plan(memory: str, weights: Any, settings: TrainSettings, runtime: Any, text_encoder_device: str,
                 text_encoder_quant: str = "none") -> Any:
    """The memory profile for this training on this machine (None on Apple's MPS, which has no profiles)."""
    from kstory.core.memory import plan_memory

    if runtime.accelerator == "mps":
        return None
    return plan_memory(memory, weights, task="train", device="cuda" if runtime.accelerator == "gpu" else "cpu",
                       pixels=settings.resolution ** 2, frames=settings.batch_size,
                       gradient_checkpointing=settings.gradient_checkpointing, text_encoder_device=text_encoder_device,
                       text_encoder_quant=text_encoder_quant, unet_quant=settings.unet_quant)


def _last_checkpoint_said(out_dir: Path, kind: str = "last") -> str:
    """Where a stopped run stands, for its message: the checkpoint the same command resumes from."""
    from kstory.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(out_dir)
    return f"the {kind} checkpoint is {last}" if last else "no checkpoint was saved before it"


def _already_finished(out_dir: Path, settings: TrainSettings, latest: Any, started: float) -> TrainResult | None:
    """The recorded result when ``out_dir`` already holds the finished run these settings ask for, else None.

    Only a ``max_steps`` schedule is known before the dataset is loaded; with
    ``epochs`` the run goes on to count the batches (and finds nothing to train).
    """
    if settings.epochs is not None or latest.step != total_steps(settings, 0):
        return None
    try:
        summary = json.loads((out_dir / "train.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    lora_path = out_dir / "lora.safetensors"
    if summary.get("status") != "finished" or summary.get("steps") != latest.step or not lora_path.is_file():
        return None
    try:
        same_settings = TrainSettings.model_validate(summary.get("settings")).fingerprint() == settings.fingerprint()
    except ValueError:  # pydantic's ValidationError: a summary from other settings
        same_settings = False
    if not same_settings:
        return None  # the full path re-exports the LoRA and warns about the changed settings
    log.info("already trained: %s is at step %d of %d, nothing to do (raise max_steps to continue)",
             out_dir, latest.step, latest.step)
    validation = summary.get("validation_dir")
    return TrainResult(
        out_dir=out_dir, lora_path=lora_path, steps=latest.step, resumed_from=latest.step,
        final_loss=summary.get("final_loss"), seconds=time.monotonic() - started, last_checkpoint=latest.path,
        validation_dir=Path(validation) if validation else None, device=summary.get("device", ""),
        precision=summary.get("precision", ""), peak_vram_bytes=None, world_size=summary.get("world_size", 1),
        effective_batch_size=summary.get("effective_batch_size"), learning_rate=summary.get("learning_rate"),
    )


def _checkpoint_within(out_dir: Path, latest: Any, steps_total: int) -> Any:
    """A shorter schedule stops at its own last step: resume from the newest checkpoint within it.

    The later checkpoints stay where they are, so raising the steps again continues from them.
    """
    from kstory.train.checkpoint import list_checkpoints, load_checkpoint

    within = [path for step, path in list_checkpoints(out_dir) if step <= steps_total]
    chosen = load_checkpoint(within[-1]) if within else None
    log.info("the schedule now ends at step %d, before the latest checkpoint (step %d): %s; later checkpoints are kept",
             steps_total, latest.step,
             f"the LoRA is taken from step {steps_total}" if chosen is not None and chosen.step == steps_total
             else f"training continues from step {chosen.step if chosen else 0} to {steps_total}")
    return chosen


def _logged_loss(path: Path, step: int) -> float | None:
    """The loss loss.csv recorded for ``step`` (a run that trained no step of its own reports it)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                if row.get("step") == str(step):
                    return float(row["loss"])
    except (OSError, ValueError, KeyError):
        return None
    return None


def _write_summary(path: Path, result: TrainResult, settings: TrainSettings, weights: Any, cache: Any,
                   steps_total: int) -> None:
    buckets: dict[str, int] = {}
    for sample in cache.samples:
        key = f"{sample.size[0]}x{sample.size[1]}"
        buckets[key] = buckets.get(key, 0) + 1
    summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(result).items()}
    summary.update({
        "status": "finished", "total_steps": steps_total, "samples": len(cache.samples), "buckets": buckets,
        "base_model": weights.identity, "base_fingerprint": weights.fingerprint, "cache": str(cache.root),
        "settings": json.loads(settings.config_json()),
    })
    write_json(path, summary)
