"""The dashboard's long actions, each a call into a stage package (never stage logic of its own)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir


def _config_models(run: RunDir) -> tuple[dict[str, Path] | None, Path | None]:
    """Like `kstory run`: the config's ControlNets ('tiny' ones are rebuilt offline) and model cache, if any."""
    if not run.config.is_file():
        return None, None
    from kstory.core.config import load_config
    from kstory.cli.stages import controlnet_paths

    config = load_config(run.config)
    controlnets = controlnet_paths(config.story.controlnets, config.cache_dir) if config.story else None
    return controlnets or None, config.cache_dir


def reroll_frame(run_root: Path, frame: str, *, seed: int | None, prompt: str | None) -> None:
    """Regenerate one frame with ``kstory.story.reroll`` (as ``kstory reroll`` does); the manifest keeps the seed history."""
    from kstory.story import reroll

    run = RunDir(Path(run_root))
    controlnets, cache_dir = _config_models(run)
    reroll(run.story, int(frame), seed=seed, prompt=prompt, controlnets=controlnets, cache_dir=cache_dir)


def repair(run_root: Path, frame: str, *, kind: str, strength: float, seed: int | None, prompt: str | None,
           mask: str | None = None, feather: int = 8, crop_padding: int | None = None, threshold: int = 128,
           inpaint_model: str | None = None) -> str:
    """Repair one frame with ``kstory.story.repair_frame`` (as ``kstory inpaint`` / ``kstory reroll --strength``)."""
    from kstory.story.manifest import read_manifest
    from kstory.story.repair_frame import repair_frame

    run = RunDir(Path(run_root))
    controlnets, cache_dir = _config_models(run)
    repair_frame(run.story, int(frame), kind=kind, strength=strength, seed=seed, prompt=prompt,
                 mask=Path(mask) if mask else None, feather=feather, crop_padding=crop_padding, threshold=threshold,
                 controlnets=controlnets, cache_dir=cache_dir, inpaint_model=inpaint_model or None)
    made = (read_manifest(run.story) or {})["frames"][str(frame)]["repairs"][-1]
    return f"frame {frame}: {kind} at strength {strength:g} with seed {made['seed']}"


def search(run_root: Path, *, candidates: int, margin: float, aesthetic_model: str) -> str:
    """``kstory search`` of the run (a goal missed is a result, not a failure: the best set found is kept)."""
    from kstory.scoring.in_memory import load_in_memory_scorer
    from kstory.submissions.search import SearchSettings, search_story

    run = RunDir(Path(run_root))
    controlnets, cache_dir = _config_models(run)
    scorer = load_in_memory_scorer(aesthetic_model, cache_dir=cache_dir)
    result = search_story(run.story, SearchSettings(candidates=candidates, margin=margin), scorer=scorer,
                          controlnets=controlnets, cache_dir=cache_dir)
    return f"{result.rendered} rendered, {result.reused} reused; {result.selection.describe()}"


UPSTREAM_NOT_READY = ("out of date", "unfinished", "new schedule")


def _frame_hashes(run: RunDir) -> dict[str, str]:
    path = run.story / "manifest.json"
    if not path.is_file():
        return {}
    frames = json.loads(path.read_text(encoding="utf-8")).get("frames") or {}
    return {str(key): str(record.get("sha256")) for key, record in frames.items() if isinstance(record, dict)}


def regenerate_story(run_root: Path) -> str:
    """The config's story stage alone, as ``kstory run`` runs it: the frames whose inputs changed are made again.

    Nothing upstream is run from the dashboard: a prep or train output that is out of date (or unfinished) is
    refused, since the story would be stamped up to date with a LoRA that is not the config's.
    """
    from kstory.cli.runner import run_config
    from kstory.cli.status import stage_states

    run = RunDir(Path(run_root))
    if not run.config.is_file():
        raise KstoryError("this run has no kstory.yaml, so the story stage's settings are unknown", path=run.root,
                          fix="generate the story with `kstory story SPEC --out RUN/story`")
    stale = [f"{stage} is {state}" for stage, state, _ in stage_states(run.root)
             if stage in ("prep", "train") and state in UPSTREAM_NOT_READY]
    if stale:
        raise KstoryError(f"the story is not regenerated here: {', '.join(stale)}", path=run.config,
                          fix="run `kstory run` on the run's kstory.yaml (it updates them, then the story)")
    before = _frame_hashes(run)
    outcomes = {outcome.stage: outcome.status for outcome in run_config(run.config, until="story", only={"story"})}
    if outcomes.get("story") == "not configured":
        raise KstoryError("the run's config has no story: section", path=run.config,
                          fix="add `story: {spec: PATH}` (docs/config.md)")
    if outcomes.get("story") == "skipped":
        return "the story is up to date with its spec: no frame made"
    after = _frame_hashes(run)
    changed = sorted((key for key, digest in after.items() if before.get(key) != digest), key=int)
    return f"frames {', '.join(changed)} made again" if changed else "no frame changed"


def rescore(run_root: Path) -> None:
    """Score the story again, and nothing else.

    With a run config this is the config's score stage alone (``kstory run``'s
    stamps stay true; prep, train and story are never re-run from here).
    Without one, the frames are scored with the models ``scores.json``
    records; with neither, it refuses rather than guess a scorer.
    """
    run = RunDir(Path(run_root))
    if run.config.is_file():
        from kstory.cli.runner import run_config

        run_config(run.config, until="score", only={"score"})
        return
    if not run.scores.is_file():
        raise KstoryError("this run has no config and no scores.json, so the scorer to use is unknown", path=run.root,
                          fix="score it once with `kstory score` and the aesthetic model you want")
    from kstory.scoring import score_images
    from kstory.scoring.recorded import recorded_models

    scores = json.loads(run.scores.read_text(encoding="utf-8"))
    aesthetic, clip = recorded_models(scores, run.scores)
    manifest = json.loads((run.story / "manifest.json").read_text(encoding="utf-8"))
    frames = [run.story / f["file"] for _, f in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0]))]
    prompts = {Path(f["file"]).name: f["prompt"] for f in manifest["frames"].values()}
    threshold = (scores.get("summary") or {}).get("threshold", 6.0)
    score_images(frames, aesthetic_model=aesthetic, clip_model=clip, prompts=prompts, threshold=threshold,
                 out=run.scores)


def build(run_root: Path, *, team: str, suffix: str, description: str, allow_failed_gate: bool,
          allow_test_model: bool = False) -> Path:
    """``kstory.submissions.build_package`` into ``RUN/submission``."""
    from kstory.submissions import build_package

    return build_package(Path(run_root), team=team, suffix=suffix, description=description or None,
                         allow_failed_gate=allow_failed_gate, allow_test_model=allow_test_model)


# --- the same actions as job steps (kstory.jobs): they run in a process of their own --------------------------

def _call(function: str, **kwargs: Any) -> dict[str, Any]:
    return {"call": f"kstory.app.actions:{function}", "kwargs": kwargs}


def reroll_steps(run_root: Path, frame: str, *, seed: int | None, prompt: str | None) -> list[dict[str, Any]]:
    """Re-roll one frame, then score the story again."""
    return [_call("reroll_frame", run_root=str(run_root), frame=str(frame), seed=seed, prompt=prompt),
            _call("rescore", run_root=str(run_root))]


def repair_steps(run_root: Path, frame: str, *, kind: str, strength: float, seed: int | None, prompt: str | None,
                 mask: Path | None = None, feather: int = 8, crop_padding: int | None = None, threshold: int = 128,
                 inpaint_model: str | None = None) -> list[dict[str, Any]]:
    """Repair one frame (inpaint or variation), then score the story again if the run is scored (or has a config
    that says how): a story that was never scored has no scorer to ask."""
    run = RunDir(Path(run_root))
    steps = [_call("repair", run_root=str(run_root), frame=str(frame), kind=kind, strength=float(strength), seed=seed,
                   prompt=prompt, mask=str(mask) if mask else None, feather=int(feather),
                   crop_padding=None if crop_padding is None else int(crop_padding), threshold=int(threshold),
                   inpaint_model=inpaint_model or None)]
    if run.scores.is_file() or run.config.is_file():
        steps.append(_call("rescore", run_root=str(run_root)))
    return steps


def search_steps(run_root: Path, *, candidates: int, margin: float, aesthetic_model: str) -> list[dict[str, Any]]:
    return [_call("search", run_root=str(run_root), candidates=int(candidates), margin=float(margin),
                  aesthetic_model=str(aesthetic_model))]


def regenerate_steps(run_root: Path) -> list[dict[str, Any]]:
    """The story stage (the frames whose inputs changed), then the story scored again if it was scored before."""
    steps = [_call("regenerate_story", run_root=str(run_root))]
    if RunDir(Path(run_root)).scores.is_file():
        steps.append(_call("rescore", run_root=str(run_root)))
    return steps


def rescore_steps(run_root: Path) -> list[dict[str, Any]]:
    return [_call("rescore", run_root=str(run_root))]


def build_steps(run_root: Path, *, team: str, suffix: str, description: str,
                allow_failed_gate: bool, allow_test_model: bool = False) -> list[dict[str, Any]]:
    return [_call("build", run_root=str(run_root), team=team, suffix=suffix, description=description,
                  allow_failed_gate=allow_failed_gate, allow_test_model=allow_test_model)]


def verify_steps(run_root: Path) -> list[dict[str, Any]]:
    """``kstory verify`` of RUN/submission with the run's base model, ControlNets and cache (from kstory.yaml)."""
    run = RunDir(Path(run_root))
    argv = ["verify", str(run.submission)]
    if run.config.is_file():
        from kstory.core.config import load_config

        config = load_config(run.config)
        argv += ["--model", str(config.model)]
        for name, value in (config.story.controlnets if config.story else {}).items():
            argv += ["--controlnet", f"{name}={value}"]
        if config.cache_dir:
            argv += ["--cache-dir", str(config.cache_dir)]
    else:
        manifest = json.loads((run.story / "manifest.json").read_text(encoding="utf-8"))
        argv += ["--model", str((manifest.get("model") or {}).get("spec", "kolors"))]
    return [{"argv": argv}]


def upload_steps(submission: Path, model_id: str, *, dry_run: bool, endpoint: str | None,
                 allow: dict[str, bool] | None = None) -> list[dict[str, Any]]:
    """``kstory upload``; the token goes to the job in its environment ($MODELSCOPE_API_TOKEN), never here.

    ``allow``: the ``allow_test_model`` / ``allow_failed_gate`` / ``allow_failed_verify`` overrides the user ticked.
    """
    argv = ["upload", str(submission), "--model-id", model_id]
    argv += ["--" + name.replace("_", "-") for name, on in (allow or {}).items() if on]
    return [{"argv": argv + (["--dry-run"] if dry_run else []) + (["--endpoint", endpoint] if endpoint else [])}]
