"""The ordered list of pipeline stages that ``kstory run`` knows about.

A stage is a name, the output it owns in the run directory, a fingerprint of
what it depends on, and a function that produces the output. Stages are added
here as they land; each one reads only documented files of earlier stages.

Fingerprints hash content, never places or times: file bytes (weights by
sampled pages), settings, and paths only as the user wrote them relative to
the config or spec. The run folder itself is never hashed, so a copied or
moved run is up to date where it was (docs/run-directory.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from kstory.cli import publish
from kstory.core.config import RunConfig
from kstory.core.errors import KstoryError
from kstory.core.hashing import path_digest
from kstory.core.rundir import RunDir, fingerprint


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    output: Callable[[RunDir], Path]
    digest: Callable[[RunConfig, RunDir], str]
    run: Callable[[RunConfig, RunDir], None]
    resumable: bool = False  # an unfinished output is continued, not moved aside
    staged: bool = False  # the stage swaps its output in itself and keeps the previous one in .history/
    # Settings that only continue or stop a finished output (train's schedule); stored in the stamp.
    schedule: Callable[[RunConfig], str] | None = None
    enabled: Callable[[RunConfig], bool] = lambda config: True  # False: not configured, skipped


def model_digest(config: RunConfig) -> str:
    """The base model: its name for kolors/tiny, the content fingerprint of a local folder (not its path)."""
    from kstory.core.models.resolve import TINY_DIR

    if config.model == "tiny":
        return f"tiny:{TINY_DIR}"  # the tiny model's build version: a new build is another model
    if config.model == "kolors":
        return config.model
    from kstory.core.models import resolve_model

    return "local:" + resolve_model(config.model, config.cache_dir).fingerprint


def run_digest(config: RunConfig) -> str:
    """What every stage depends on: the base model and the run's seed."""
    return fingerprint(model_digest(config), config.seed)


def stage_fingerprints(config: RunConfig, run: RunDir, stages: tuple[Stage, ...] | None = None
                       ) -> Iterator[tuple[Stage, str | None, dict[str, str]]]:
    """Each stage with its fingerprint (chained on the one before; None when not configured) and its schedule.

    A generator on purpose: ``kstory run`` takes the next fingerprint only after the stage before it ran, since
    a stage's inputs are the files the one before wrote. ``kstory status`` walks it without running anything.
    """
    upstream = run_digest(config)
    for stage in STAGES if stages is None else stages:
        if not stage.enabled(config):
            yield stage, None, {}
            continue
        upstream = fingerprint(upstream, stage.digest(config, run))
        yield stage, upstream, ({"schedule": stage.schedule(config)} if stage.schedule is not None else {})


def _prep_digest(config: RunConfig, run: RunDir) -> str:
    from kstory.prep.recipe import DEFAULT_RECIPE

    prep = config.prep
    source = Path(prep.source)
    # A local folder by its files' bytes (names relative to it); a hub dataset by its name.
    source_state = path_digest(source) if "://" not in prep.source and not prep.source.startswith("ms:") else prep.source
    # num_proc only spreads the work: the same input gives the same output.
    return fingerprint("prep", {"trigger_word": prep.trigger_word}, source_state,
                       path_digest(prep.recipe or DEFAULT_RECIPE))


def _prep_run(config: RunConfig, run: RunDir) -> None:
    from kstory.prep import prep

    prep(
        config.prep.source,
        run.data,
        recipe=config.prep.recipe,
        trigger_word=config.prep.trigger_word,
        num_proc=config.prep.num_proc,
        executor=config.prep.executor,
        ray_address=config.prep.ray_address,
    )


def _train_digest(config: RunConfig, run: RunDir) -> str:
    # The LoRA's identity only: the schedule (max_steps, cadences, devices) continues or stops it.
    if config.text_encoder_quant != "none":  # integer ChatGLM captions train another LoRA
        return fingerprint("train", config.train_settings().fingerprint(), {"text_encoder_quant": config.text_encoder_quant})
    return fingerprint("train", config.train_settings().fingerprint())


def _train_schedule(config: RunConfig) -> str:
    return fingerprint(config.train_settings().schedule())


def _train_run(config: RunConfig, run: RunDir) -> None:
    from kstory.train import train_lora

    train_lora(run.data, run.lora, config.train_settings(), model=config.model, cache_dir=config.cache_dir,
               memory=config.memory, text_encoder_device=config.text_encoder_device,
               text_encoder_quant=config.text_encoder_quant)


def controlnet_paths(controlnets: dict[str, str], cache_dir: Path | None) -> dict[str, Path]:
    """Turn name -> path-or-'tiny' into name -> weights path, building the tiny ones offline."""
    if not controlnets:
        return {}
    tiny = {}
    if "tiny" in controlnets.values():
        from kstory.story import build_tiny_controlnets

        tiny = build_tiny_controlnets(cache_dir)
        unknown = sorted(name for name, value in controlnets.items() if value == "tiny" and name not in tiny)
        if unknown:
            raise KstoryError(f"no tiny ControlNet named {', '.join(unknown)}",
                              fix=f"'tiny' works for the names {', '.join(sorted(tiny))}; give other names a weights path")
    return {name: Path(tiny[name]) if value == "tiny" else Path(value) for name, value in controlnets.items()}


def _story_references(spec_path: Path) -> list[tuple[str, str, str]]:
    """(where in the spec, relative path as written, content hash) of every file the spec points at."""
    from kstory.story.spec import load_spec

    spec_dir = spec_path.parent
    spec = load_spec(spec_path)

    def entry(where: str, path: Path | None, sampled: bool = False) -> list[tuple[str, str, str]]:
        if path is None:
            return []
        if path.is_absolute():  # a place outside the run: only its content counts
            return [(where, "", path_digest(path, sampled=sampled))]
        return [(where, path.as_posix(), path_digest(spec_dir / path, sampled=sampled))]

    found = []
    for name, ref in sorted(spec.controlnets.items()):
        found += entry(f"controlnets.{name}", ref.path, sampled=True)
    reference = spec.character.reference
    if reference is not None:
        found += entry("character.reference.image", reference.image)
        if reference.adapter and reference.adapter != "tiny":
            found += entry("character.reference.adapter", Path(reference.adapter), sampled=True)
    for f, frame in enumerate(spec.frames, start=1):
        for g, guide in enumerate(frame.guides):
            for field in ("image", "detector", "depth_model"):
                found += entry(f"frames.{f}.guides.{g}.{field}", getattr(guide, field, None), sampled=field != "image")
    return found


def _story_digest(config: RunConfig, run: RunDir) -> str:
    # The user's spec and what it references, never the story folder: a re-roll does not make the story stale.
    story = config.story
    controlnets = {name: value if value == "tiny" else path_digest(Path(value), sampled=True)
                   for name, value in sorted(story.controlnets.items())}
    spec = story.spec
    references = _story_references(spec) if spec.is_file() else []
    # The checkpoint picked on the dashboard (only that field of review.json): a new pick is a new LoRA.
    from kstory.story.review import load

    picked = load(run.story).checkpoint
    settings = {"lora_scale": story.lora_scale}
    for name in ("memory", "text_encoder_device", "text_encoder_quant"):  # may change pixels; unset keeps older runs' digests
        if name in config.model_fields_set:
            settings[name] = getattr(config, name)
    # The user's own LoRAs by content, scale, source and licence flag, in order (only when there are any).
    loras = [{"content": path_digest(lora.path), "scale": lora.scale, "source": lora.source, "ship": lora.ship}
             for lora in story.loras]
    return fingerprint("story", settings, controlnets, path_digest(spec), references,
                       *([{"checkpoint": picked}] if picked else []), *([{"loras": loras}] if loras else []))


def _story_run(config: RunConfig, run: RunDir) -> None:
    from kstory.story import generate_story
    from kstory.story.review import story_lora

    from kstory.core.lora_stack import LoraRequest

    lora, checkpoint = story_lora(run.lora, run.story)  # the picked checkpoint's LoRA, else the final one
    generate_story(
        config.story.spec, run.story, model=config.model, lora=lora, lora_checkpoint=checkpoint,
        lora_scale=config.story.lora_scale, controlnets=controlnet_paths(config.story.controlnets, config.cache_dir),
        cache_dir=config.cache_dir, memory=config.memory, text_encoder_device=config.text_encoder_device,
        text_encoder_quant=config.text_encoder_quant,
        loras=[LoraRequest(lora.path, lora.scale, lora.source, lora.ship) for lora in config.story.loras],
        ray=config.ray,
    )


def _score_digest(config: RunConfig, run: RunDir) -> str:
    # The story folder changes under a reroll without its stamp changing, so its manifest is part of the key.
    return fingerprint("score", config.score.model_dump(mode="json"), path_digest(run.story / "manifest.json"))


def _score_run(config: RunConfig, run: RunDir) -> None:
    import json

    from kstory.scoring import render_table, score_images

    from kstory.core.logs import get_logger

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
        schedule=_train_schedule,
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
    Stage(
        name="package",
        summary="build the ModelScope package and verify it regenerates -> submission/",
        output=lambda run: run.submission,
        digest=publish.package_digest,
        run=publish.package_run,
        staged=True,  # build_package keeps the previous package in .history/ itself
        enabled=lambda config: config.story is not None and config.package is not None,
    ),
    Stage(
        name="upload",
        summary="upload the package to ModelScope -> submission/.upload.json",
        output=publish.upload_output,
        digest=publish.upload_digest,
        run=publish.upload_run,
        enabled=lambda config: config.story is not None and config.package is not None
        and config.upload is not None and config.upload.enabled,
    ),
)
