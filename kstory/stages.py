"""The ordered list of pipeline stages that ``kstory run`` knows about.

A stage is a name, the output it owns in the run directory, a fingerprint of
what it depends on, and a function that produces the output. Stages are added
here as they land; each one reads only documented files of earlier stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kstory.config import RunConfig
from kstory.errors import KstoryError
from kstory.hashing import sha256_file
from kstory.rundir import RunDir, fingerprint, folder_fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    output: Callable[[RunDir], Path]
    digest: Callable[[RunConfig, RunDir], str]
    run: Callable[[RunConfig, RunDir], None]
    resumable: bool = False  # an unfinished output is continued, not moved aside
    staged: bool = False  # the stage swaps its output in itself and keeps the previous one in .history/
    enabled: Callable[[RunConfig], bool] = lambda config: True  # False: not configured, skipped


def _file_digest(path: Path | None) -> str | None:
    if path is None:
        return None
    return sha256_file(path) if path.is_file() else f"missing:{path}"


def _prep_digest(config: RunConfig, run: RunDir) -> str:
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


def _train_digest(config: RunConfig, run: RunDir) -> str:
    return fingerprint("train", config.train_settings().model_dump(mode="json"), str(config.cache_dir))


def _train_run(config: RunConfig, run: RunDir) -> None:
    from train import train_lora

    train_lora(run.data, run.lora, config.train_settings(), model=config.model, cache_dir=config.cache_dir)


def controlnet_paths(controlnets: dict[str, str], cache_dir: Path | None) -> dict[str, Path]:
    """Turn name -> path-or-'tiny' into name -> weights path, building the tiny ones offline."""
    if not controlnets:
        return {}
    tiny = {}
    if "tiny" in controlnets.values():
        from story import build_tiny_controlnets

        tiny = build_tiny_controlnets(cache_dir)
        unknown = sorted(name for name, value in controlnets.items() if value == "tiny" and name not in tiny)
        if unknown:
            raise KstoryError(f"no tiny ControlNet named {', '.join(unknown)}",
                              fix=f"'tiny' works for the names {', '.join(sorted(tiny))}; give other names a weights path")
    return {name: Path(tiny[name]) if value == "tiny" else Path(value) for name, value in controlnets.items()}


def _story_digest(config: RunConfig, run: RunDir) -> str:
    story = config.story
    return fingerprint("story", story.model_dump(mode="json"), _file_digest(story.spec),
                       folder_fingerprint(story.spec.parent) if story.spec.parent.is_dir() else None)


def _story_run(config: RunConfig, run: RunDir) -> None:
    from story import generate_story

    lora = run.lora / "lora.safetensors"
    generate_story(
        config.story.spec, run.story, model=config.model, lora=lora if lora.is_file() else None,
        lora_scale=config.story.lora_scale, controlnets=controlnet_paths(config.story.controlnets, config.cache_dir),
        cache_dir=config.cache_dir,
    )


def _score_digest(config: RunConfig, run: RunDir) -> str:
    # The story folder changes under a reroll without its stamp changing, so its manifest is part of the key.
    return fingerprint("score", config.score.model_dump(mode="json"), _file_digest(run.story / "manifest.json"))


def _score_run(config: RunConfig, run: RunDir) -> None:
    import json

    from scoring import render_table, score_images

    from kstory.logs import get_logger

    manifest = json.loads((run.story / "manifest.json").read_text(encoding="utf-8"))
    frames = [run.story / frame["file"] for _, frame in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0]))]
    prompts = {Path(frame["file"]).name: frame["prompt"] for frame in manifest["frames"].values()}
    report = score_images(
        frames, aesthetic_model=config.score.aesthetic_for(config.model), clip_model=config.score.clip_model,
        prompts=prompts, threshold=config.score.threshold, batch_size=config.score.batch_size,
        out=run.scores, cache_dir=config.cache_dir,
    )
    get_logger("score").info("%s", render_table(report))


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
    Stage(
        name="story",
        summary="generate the story's frames with the LoRA and ControlNet guides -> story/",
        output=lambda run: run.story,
        digest=_story_digest,
        run=_story_run,
        staged=True,
        enabled=lambda config: config.story is not None,
    ),
    Stage(
        name="score",
        summary="score the frames: the aesthetic gate, CLIP-T and CLIP-I -> scores.json",
        output=lambda run: run.scores,
        digest=_score_digest,
        run=_score_run,
        enabled=lambda config: config.story is not None,
    ),
)
