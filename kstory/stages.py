"""The ordered list of pipeline stages that ``kstory run`` knows about.

A stage is a name, the output it owns in the run directory, a fingerprint of
what it depends on, and a function that produces the output. Stages are added
here as they land; each one reads only documented files of earlier stages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kstory.config import RunConfig
from kstory.rundir import RunDir, fingerprint, folder_fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    output: Callable[[RunDir], Path]
    digest: Callable[[RunConfig], str]
    run: Callable[[RunConfig, RunDir], None]
    resumable: bool = False  # an unfinished output is continued, not moved aside


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else f"missing:{path}"


def _prep_digest(config: RunConfig) -> str:
    from data_prep.recipe import DEFAULT_RECIPE

    source = Path(config.prep.source)
    source_state = folder_fingerprint(source) if source.is_dir() else config.prep.source
    recipe = config.prep.recipe or DEFAULT_RECIPE
    return fingerprint("prep", config.prep.model_dump(mode="json"), source_state, _file_digest(recipe))


def _prep_run(config: RunConfig, run: RunDir) -> None:
    from data_prep import prep

    prep(
        config.prep.source,
        run.data,
        recipe=config.prep.recipe,
        trigger_word=config.prep.trigger_word,
        num_proc=config.prep.num_proc,
    )


def _train_digest(config: RunConfig) -> str:
    return fingerprint("train", config.train_settings().model_dump(mode="json"), str(config.cache_dir))


def _train_run(config: RunConfig, run: RunDir) -> None:
    from train import train_lora

    train_lora(run.data, run.lora, config.train_settings(), model=config.model, cache_dir=config.cache_dir)


STAGES: tuple[Stage, ...] = (
    Stage(
        name="prep",
        summary="clean the image-caption dataset with Data-Juicer -> data/",
        output=lambda run: run.data,
        digest=_prep_digest,
        run=_prep_run,
    ),
    Stage(
        name="train",
        summary="train a Kolors LoRA with DiffSynth-Studio and Lightning -> lora/",
        output=lambda run: run.lora,
        digest=_train_digest,
        run=_train_run,
        resumable=True,
    ),
)
