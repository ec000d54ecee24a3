"""``kstory run``: every stage in order, skipping what is already up to date."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from kstory.core import atomic
from kstory.core.config import RunConfig, load_config
from kstory.core.errors import KstoryError
from kstory.core.logs import FILE_ONLY, get_logger, log_to_file
from kstory.core.ranks import secondary_rank
from kstory.core.rundir import RunDir, fingerprint, move_to_history, read_stamp, write_stamp
from kstory.cli.stages import STAGES, Stage, stage_fingerprints

log = get_logger("run")


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str  # "ran", "skipped" (up to date), "not configured" or "out of date" (left alone: not in ``only``)
    output: Path
    seconds: float


def _keep_config_copy(config_path: Path, run: RunDir) -> None:
    """Keep the config that produced the run inside it, so the run explains itself."""
    if config_path.resolve() == run.config.resolve():
        return
    text = config_path.read_text(encoding="utf-8")
    if run.config.exists() and run.config.read_text(encoding="utf-8") != text:
        moved = move_to_history(run, run.config)
        log.info("config changed: previous copy kept at %s", moved)
    atomic.write_text(run.config, text)


def run_config(config_path: str | Path, *, model: str | None = None, until: str | None = None,
               only: set[str] | None = None, use_final_lora: bool = False, upload: bool = False) -> list[StageOutcome]:
    """Run the stages of the config at ``config_path`` in order; return what ran and what was skipped.

    ``until`` stops after the named stage, so a notebook can walk the run one
    stage per cell with the same stamps and skipping as ``kstory run``.
    ``only`` runs just the named stages when they are out of date and leaves
    the others as they are (the dashboard re-scores without touching the story).
    ``use_final_lora`` clears the checkpoint picked on the dashboard first, so the
    story is made with ``lora/lora.safetensors`` (the user's confirmation when the
    picked checkpoint is gone).
    ``upload`` uploads the package (the config's ``upload:`` section says where) even when ``upload.enabled`` is false.
    """
    config_path = Path(config_path)
    stages = _stages_until(until)
    config: RunConfig = load_config(config_path)
    if model is not None:
        config = config.model_copy(update={"model": model})
    if upload:
        if config.upload is None:
            raise KstoryError("--upload: the config has no upload: section", path=config_path,
                              fix="add `upload: {model_id: OWNER/NAME}` next to `package:` (docs/config.md)")
        config = config.model_copy(update={"upload": config.upload.model_copy(update={"enabled": True})})
    if secondary_rank():
        return _train_on_secondary_rank(config, stages)
    run = RunDir(config.run_dir).ensure()
    outcomes: list[StageOutcome] = []
    with log_to_file(run.log):
        log.info("run %s in %s (model: %s)", config.name, run.root, config.model)
        _keep_config_copy(config_path, run)
        if use_final_lora:
            from kstory.story.review import drop_checkpoint

            dropped = drop_checkpoint(run.story)
            if dropped:
                log.info("dropped the picked checkpoint %s (--use-final-lora): the story uses lora/lora.safetensors",
                         dropped)
        try:
            _run_stages(config, run, stages, outcomes, only)
        except BaseException as exc:
            log.error("run stopped: %s", exc, exc_info=not isinstance(exc, KstoryError), extra=FILE_ONLY)
            raise
    return outcomes


def _train_on_secondary_rank(config: RunConfig, stages: tuple[Stage, ...]) -> list[StageOutcome]:
    """Another process of a multi-process training (Lightning's launcher re-ran ``kstory run``): train only.

    Rank 0 runs the stages, stamps and logs; it reaches the training with prep
    done, and only then are the other processes started. They join the
    training and write nothing.
    """
    train = next((stage for stage in stages if stage.name == "train"), None)
    if train is not None:
        train.run(config, RunDir(config.run_dir))
    return []


def _stages_until(until: str | None) -> tuple[Stage, ...]:
    names = [stage.name for stage in STAGES]
    if until is None:
        return STAGES
    if until not in names:
        raise KstoryError(f"unknown stage {until!r}", fix=f"use one of: {', '.join(names)}")
    return STAGES[: names.index(until) + 1]


def _run_stages(config: RunConfig, run: RunDir, stages: tuple[Stage, ...], outcomes: list[StageOutcome],
                only: set[str] | None = None) -> None:
    for stage, digest, schedule in stage_fingerprints(config, run, stages):
        started = time.monotonic()
        output = stage.output(run)
        if digest is None:
            log.info("%s: not configured, skipped (add a `%s:` section to the config)", stage.name, stage.name)
            outcomes.append(StageOutcome(stage.name, "not configured", output, 0.0))
            continue
        stamp = read_stamp(output) or {}
        same_inputs = stamp.get("fingerprint") == digest
        finished = same_inputs and stamp.get("finished", True)
        same_schedule = stamp.get("schedule", schedule.get("schedule")) == schedule.get("schedule")
        if finished and same_schedule:
            log.info("%s: up to date, skipped (%s)", stage.name, output)
            outcomes.append(StageOutcome(stage.name, "skipped", output, 0.0))
            continue
        if only is not None and stage.name not in only:
            log.warning("%s: out of date, not run here (run `kstory run` to update it)", stage.name)
            outcomes.append(StageOutcome(stage.name, "out of date", output, 0.0))
            continue
        if finished:
            log.info("%s: same inputs, new schedule: continuing the finished output in %s", stage.name, output)
        elif same_inputs and stage.resumable:
            log.info("%s: resuming the unfinished output in %s", stage.name, output)
        elif stage.staged:
            log.info("%s: updating %s (unchanged parts are kept, the previous version goes to .history/)",
                     stage.name, output)
        elif output.exists():
            moved = move_to_history(run, output)
            reason = "settings or inputs changed" if stamp and not same_inputs else "it never finished"
            log.warning("%s: previous output kept at %s (%s)", stage.name, moved, reason)
        if stage.resumable:
            output.mkdir(parents=True, exist_ok=True)
            write_stamp(output, stage.name, digest, finished=False, **schedule)
        log.info("%s: %s", stage.name, stage.summary)
        stage.run(config, run)
        write_stamp(output, stage.name, digest, finished=True, **schedule)
        seconds = time.monotonic() - started
        log.info("%s: done in %.1f s", stage.name, seconds)
        outcomes.append(StageOutcome(stage.name, "ran", output, seconds))
