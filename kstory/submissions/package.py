"""``kstory package RUN``: ``runs/<name>/submission/`` as a ModelScope model repo.

Layout (docs/submissions.md)::

    README.md                          model card: ModelScope front matter + description, images, snippet
    configuration.json                 ModelScope's framework/task file
    lora.safetensors                   the LoRA the frames were made with, in DiffSynth's own (kstory) key format
    pytorch_lora_weights.safetensors   diffusers format (KolorsPipeline.load_lora_weights)
    lora_kohya.safetensors             kohya-style keys (ComfyUI with Kolors-MZ, diffusers)
    frames/NN.png  guides/*.png  story.yaml  manifest.json  scores.json   in the order of story/review.json
    forum_post.md                      the forum post, title in the required format
    kstory_package.json                what was packaged, with the sha256 of every file above

The package is built in a staging folder and moved into place; an older
``submission/`` of the run goes to ``.history/``.
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kstory.core.atomic import atomic_directory, copy_file, write_json, write_text
from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.logs import get_logger
from kstory.submissions.naming import MIDDLE, model_name
from kstory.story import review
from kstory.submissions.provenance import ALLOW_FLAG, Provenance, provenance

log = get_logger("package")
FORMAT = "kstory-submission/1"
PACKAGE_FILE = "kstory_package.json"
VERIFY_FILE = "verify.json"  # written by `kstory verify` next to the index; not part of the hashed files
MIN_FRAMES = 8
BASE_MODEL = "Kwai-Kolors/Kolors"
TASK = "text-to-image-synthesis"
FORUM_FILE = "forum_post.md"
# The challenge's forum post title: the model name, prefixed with the challenge tag.
FORUM_TITLE = "【可图Kolors训练】{name}"


def _read_json(path: Path, what: str, fix: str) -> dict[str, Any]:
    if not path.is_file():
        raise KstoryError(f"{what} not found", path=path, fix=fix)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise KstoryError(f"unreadable {what} ({error})", path=path, fix=fix) from error


def _inside(story: Path, relative: Any, what: str) -> Path:
    """``story / relative``, refused when a hand-edited manifest points outside the story folder."""
    text = str(relative or "")
    target = (story / text).resolve()
    if not text or Path(text).is_absolute() or not target.is_relative_to(story.resolve()) or target == story.resolve():
        raise KstoryError(f"manifest.json names {what} {text!r} outside the story folder", path=story / "manifest.json",
                          fix="regenerate the story with `kstory story` (its manifest names files inside story/)")
    return target


def _story_lora(lora_dir: Path, manifest: dict[str, Any]) -> Path:
    """The LoRA the manifest's frames were made with, found by sha256 in the run's ``lora/`` folder.

    The checkpoint the manifest names is tried first, then ``lora/lora.safetensors``, then every checkpoint.
    """
    from kstory.story.review import CHECKPOINTS, FINAL_LORA, checkpoint_lora

    used = manifest.get("lora") or {}
    if not used.get("sha256"):
        raise KstoryError("the story was generated without a LoRA", path=lora_dir.parent / "story" / "manifest.json",
                          fix="run `kstory run` (or `kstory story --lora`) again so the story uses the run's LoRA")
    named = used.get("checkpoint")
    first = checkpoint_lora(lora_dir, named) if named else lora_dir / FINAL_LORA
    seen: set[Path] = set()
    for path in [first, lora_dir / FINAL_LORA, *sorted((lora_dir / CHECKPOINTS).glob(f"*/{FINAL_LORA}"))]:
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        if sha256_file(path) == used["sha256"]:
            return path
    what = f"checkpoint {named}" if named else "the final LoRA"
    raise KstoryError(
        f"the run has no LoRA with the sha256 the story was made with ({what}, {used['sha256'][:12]}); "
        "it was retrained or deleted since", path=first,
        fix="run `kstory run` (or `kstory story`) again so the frames are made with a LoRA the run has",
    )


def _check_run(run_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any], Path, dict[str, str]]:
    """The LoRA the story was made with, the manifest, scores and story folder, checked against each other."""
    from kstory.core.lora import read_lora
    from kstory.story.review import CHECKPOINTS, FINAL_LORA

    lora_dir = run_dir / "lora"
    if not (lora_dir / FINAL_LORA).is_file() and not any((lora_dir / CHECKPOINTS).glob(f"*/{FINAL_LORA}")):
        raise KstoryError("the run has no LoRA", path=lora_dir / FINAL_LORA,
                          fix="run `kstory train` (or `kstory run`) first")
    story = run_dir / "story"
    manifest = _read_json(story / "manifest.json", "story manifest", "run `kstory story` first")
    frames = manifest.get("frames", {})
    for key, frame in frames.items():
        _inside(story, frame.get("file"), f"frame {key}'s file")
        for guide in frame.get("guides", []):
            _inside(story, guide.get("file"), f"frame {key}'s guide")
    present = [k for k, f in frames.items() if (story / f["file"]).is_file()]
    if len(present) < MIN_FRAMES:
        raise KstoryError(
            f"the story has {len(present)} frame(s); a submission needs at least {MIN_FRAMES}",
            path=story, fix=f"generate a story of {MIN_FRAMES} frames with `kstory story`",
        )
    for key, frame in frames.items():
        path = story / frame["file"]
        if not path.is_file():
            raise KstoryError(f"frame {key} is missing", path=path, fix="regenerate it with `kstory story --frames`")
        if sha256_file(path) != frame["sha256"]:
            raise KstoryError(f"frame {key} differs from the one the manifest recorded (edited after generation?)",
                              path=path, fix="regenerate the frame with `kstory story --frames N`")
        for guide in frame.get("guides", []):
            if not (story / guide["file"]).is_file():
                raise KstoryError("guide image missing", path=story / guide["file"], fix="regenerate the story")
    _check_spec_copy(story, manifest)
    lora = _story_lora(lora_dir, manifest)
    _, lora_meta = read_lora(lora)
    scores = _read_json(run_dir / "scores.json", "scores.json", "run `kstory score` first")
    scored = {Path(i["file"]).name: i.get("sha256") for i in scores.get("images", [])}
    unscored = sorted((k for k, f in frames.items() if Path(f["file"]).name not in scored), key=int)
    if unscored:
        raise KstoryError(f"scores.json does not score frame(s) {', '.join(unscored)}; every frame must be scored",
                          path=run_dir / "scores.json", fix=f"run `kstory score {run_dir}`")
    for key, frame in frames.items():
        name = Path(frame["file"]).name
        if scored.get(name) not in (None, frame["sha256"]):
            raise KstoryError(f"scores.json scored another version of frame {key}", path=run_dir / "scores.json",
                              fix=f"run `kstory score {run_dir}` again")
    return lora, manifest, scores, story, lora_meta


def _check_spec_copy(story: Path, manifest: dict[str, Any]) -> None:
    """story.yaml ships beside manifest.json: refuse a package where they tell different stories."""
    from kstory.story.spec_copy import SPEC_COPY, disagreements

    problems = disagreements(story / SPEC_COPY, manifest)
    if problems:
        raise KstoryError(
            f"{SPEC_COPY} and manifest.json disagree: " + "; ".join(problems[:3]) +
            (f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""),
            path=story / SPEC_COPY,
            fix="the manifest is the source of truth: re-roll the frame again (`kstory reroll`) or regenerate the "
                "story with `kstory story`, which write both",
        )


def _in_order(manifest: dict[str, Any], order: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """The manifest with its frames renumbered 1.. in ``order`` (story frame keys) and files renamed to match.

    Each frame keeps its story number in ``story_frame`` (verify regenerates it from that spec entry).
    Returns the new manifest and old -> new relative file names (frames and guides).
    """
    from kstory.story.manifest import frame_name

    frames, renames = {}, {}
    for position, key in enumerate(order, start=1):
        record = copy.deepcopy(manifest["frames"][key])
        old, new = frame_name(int(key)), frame_name(position)
        renames[record["file"]] = f"frames/{new}.png"
        record["file"] = renames[record["file"]]
        for guide in record.get("guides", []):
            name = Path(guide["file"]).name
            renamed = new + name[len(old):] if name.startswith(f"{old}-") else f"{new}-{name}"
            renames[guide["file"]] = f"guides/{renamed}"
            guide["file"] = renames[guide["file"]]
        for repair in record.get("repairs", []):  # masks and source pictures ship under their own names
            renames.update({name: name for name in (repair.get("source_file"), repair.get("mask_file")) if name})
        reference = ((record.get("ip_adapter") or {}).get("reference") or {}).get("file")
        if reference:  # the character reference image ships as it is (verify makes the frames from it)
            renames[reference] = reference
        face = record.get("face_id") or {}
        renames.update({face[part]["file"]: face[part]["file"] for part in ("embedding", "crop") if face.get(part)})
        record["story_frame"] = int(key)
        frames[str(position)] = record
    return {**manifest, "frames": frames}, renames


def _scores_in_order(scores: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
    """scores.json with frame file names changed by ``names`` (old -> new file name) and images in the new order."""

    def rename(text: Any) -> Any:
        if not isinstance(text, str) or Path(text).name not in names:
            return text
        return Path(text).with_name(names[Path(text).name]).as_posix()

    out = copy.deepcopy(scores)
    for group in ("images", "skipped"):
        for item in out.get(group, []):
            item["file"] = rename(item.get("file"))
    summary = out.get("summary", {})
    for item in summary.get("weakest", []) or []:
        item["file"] = rename(item.get("file"))
    if "odd_one_out" in summary:
        summary["odd_one_out"] = rename(summary["odd_one_out"])
    out["images"] = sorted(out.get("images", []), key=lambda item: Path(str(item.get("file"))).name)
    return out


def _training_summary(run_dir: Path, lora_meta: dict[str, str]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "rank": int(lora_meta.get("kstory.rank", 0)), "alpha": float(lora_meta.get("kstory.alpha", 0)),
        "target_modules": lora_meta.get("kstory.target_modules", ""), "steps": int(lora_meta.get("kstory.step", 0)),
    }
    train_json = run_dir / "lora" / "train.json"
    if train_json.is_file():
        try:
            data = json.loads(train_json.read_text(encoding="utf-8"))
        except ValueError:
            data = {}
        settings = data.get("settings", {})
        for key in ("learning_rate", "resolution", "batch_size", "lr_scheduler"):
            if key in settings:
                summary[key] = settings[key]
        for key in ("samples", "final_loss", "device"):
            if key in data:
                summary[key] = data[key]
    return summary


def _front_matter(license_id: str, trigger: str, origin: Provenance) -> str:
    if origin.is_test:
        tags = ["LoRA", "test-artefact", "DiffSynth-Studio"]
    else:
        tags = ["LoRA", "Kolors", MIDDLE, "DiffSynth-Studio", "text-to-image"] + ([trigger] if trigger else [])
    lines = ["---", "frameworks:", "- Pytorch", f"license: {license_id}", "tasks:", f"- {TASK}",
             "base_model:", f"- {json.dumps(origin.base_model, ensure_ascii=False)}", "base_model_relation: adapter",
             "tags:"]
    lines += [f"- {json.dumps(tag, ensure_ascii=False)}" for tag in tags]
    return "\n".join(lines + ["---", ""])


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _test_notice(origin: Provenance) -> str:
    if not origin.is_test:
        return ""
    reasons = "\n".join(f"- {reason}" for reason in origin.reasons)
    return (f"> **TEST ARTEFACT: this is not a Kolors LoRA.** It was packaged with `{ALLOW_FLAG}`; "
            f"the base model is `{origin.base_model}`, and the pictures and scores mean nothing:\n>\n"
            + "\n".join(f"> {line}" for line in reasons.splitlines()) + "\n\n")


def _gate_notice(scores: dict[str, Any]) -> str:
    """A visible line when the package was built although the score gate did not pass (--allow-failed-gate)."""
    summary = scores.get("summary", {})
    if summary.get("gate") == "pass":
        return ""
    return (f"> **Score gate not passed:** mean aesthetic score {summary.get('mean')} is below the threshold "
            f"{summary.get('threshold')} (the challenge disqualifies such a story). It was packaged anyway with "
            f"`--allow-failed-gate`.\n\n")


def _readme(name: str, *, description: str, trigger: str, training: dict[str, Any], manifest: dict[str, Any],
            scores: dict[str, Any], strength: float, license_id: str, origin: Provenance, other_loras: str = "") -> str:
    by_file = {Path(i["file"]).name: i for i in scores.get("images", [])}
    summary = scores.get("summary", {})
    rows = []
    for key, frame in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0])):
        score = by_file.get(Path(frame["file"]).name, {}).get("aesthetic")
        shown = f"{score:.3f}" if isinstance(score, (int, float)) else "-"
        rows.append(f"| {key} | ![{key}]({frame['file']}) | {_cell(frame['prompt'])} | {frame['seed']} | {shown} |")
    first = manifest["frames"][sorted(manifest["frames"], key=int)[0]]
    mean = summary.get("mean")
    training_lines = "\n".join(f"- {k}: {v}" for k, v in training.items())
    base = origin.base_model
    base_line = (f"Base model: [{base}](https://www.modelscope.cn/models/{base})" if not origin.is_test
                 else f"Base model: `{base}` (a test model, not {BASE_MODEL})")
    return f"""{_front_matter(license_id, trigger, origin)}
# {name}

{_test_notice(origin)}{_gate_notice(scores)}{description}

**Trigger word:** `{trigger or "(none)"}` (put it at the start of the prompt).

{base_line}, LoRA trained with kstory on DiffSynth-Studio.

## Training

{training_lines}

## Images

Aesthetic mean {mean if mean is None else f"{mean:.3f}"} (threshold {summary.get("threshold")}, gate: {summary.get("gate")}).
Every frame's prompt, negative prompt, seed, size, steps, CFG and ControlNet guide are in `manifest.json`.

| # | image | prompt | seed | aesthetic |
|---|---|---|---|---|
{chr(10).join(rows)}

## Files

| file | loads in |
|---|---|
| `lora.safetensors` | DiffSynth-Studio (`ModelManager.load_lora`, `lora_alpha={strength!r}`) |
| `pytorch_lora_weights.safetensors` | diffusers `KolorsPipeline.load_lora_weights` (diffusers >= 0.34 reads the alpha) |
| `lora_kohya.safetensors` | ComfyUI with Kolors-MZ (model-only LoRA loader), diffusers `KolorsPipeline`; not WebUI or kohya sd-scripts, which do not run Kolors |
{other_loras}
## Use with DiffSynth-Studio

```python
import torch
from diffsynth import ModelManager, KolorsImagePipeline, download_models

download_models(["Kolors"])
manager = ModelManager(torch_dtype=torch.float16, device="cuda", file_path_list=[
    "models/kolors/Kolors/text_encoder",
    "models/kolors/Kolors/unet/diffusion_pytorch_model.safetensors",
    "models/kolors/Kolors/vae/diffusion_pytorch_model.safetensors",
])
manager.load_lora("lora.safetensors", lora_alpha={strength!r})  # the strength the frames were made at
pipe = KolorsImagePipeline.from_model_manager(manager)
image = pipe(prompt={json.dumps(first["prompt"], ensure_ascii=False)},
             negative_prompt={json.dumps(first["negative_prompt"], ensure_ascii=False)},
             seed={first["seed"]}, height={first["height"]}, width={first["width"]},
             num_inference_steps={first["steps"]}, cfg_scale={first["cfg_scale"]})
image.save("frame-1.png")
```

The frames were also conditioned on the ControlNet guides in `guides/`; to regenerate all of them
exactly (and compare them pixel by pixel) run `kstory verify .` in this folder.
"""


def _forum_post(name: str, owner: str | None, description: str, trigger: str, scores: dict[str, Any],
                origin: Provenance) -> str:
    owner_part = owner or "<owner>"
    mean = scores.get("summary", {}).get("mean")
    return f"""# {FORUM_TITLE.format(name=name)}

Model: https://www.modelscope.cn/models/{owner_part}/{name}

{_test_notice(origin)}{_gate_notice(scores)}{description}

- Trigger word: `{trigger or "(none)"}`
- Base model: {origin.base_model}
- 8 story frames with prompts, seeds and guides are in the model repo (manifest.json).
- Aesthetic mean: {mean if mean is None else f"{mean:.3f}"}
"""


def build_package(
    run_dir: str | Path, *, team: str, suffix: str, allow_failed_gate: bool = False, out: str | Path | None = None,
    description: str | None = None, owner: str | None = None, license_id: str = "apache-2.0",
    allow_test_model: bool = False,
) -> Path:
    """Package the run into ``out`` (default ``RUN/submission``); returns the folder.

    Refuses (KstoryError) a missing LoRA, fewer than 8 frames, frames edited
    after generation, a story whose LoRA the run's lora/ folder no longer has, a manifest naming files
    outside the story folder, a scores.json missing a frame, a name breaking the
    rule; unless ``allow_failed_gate``, a run whose score gate did not pass; and
    unless ``allow_test_model``, a run made with a test model (submissions.provenance),
    which is then labelled a test artefact in the model card and configuration.json.
    The frames go out in the order chosen on the dashboard (``story/review.json``),
    renumbered 1..N; the locked ones are recorded in ``kstory_package.json``.
    """
    from kstory.submissions.lora_export import FILE_NAMES, export_lora
    from kstory.submissions.candidates_export import export_candidates
    from kstory.submissions.user_loras import model_card_section, ship_user_loras

    run_dir = Path(run_dir).resolve()
    name = model_name(team, suffix)
    lora, manifest, scores, story, lora_meta = _check_run(run_dir)
    origin = provenance(manifest, scores, lora_meta.get("kstory.base_model"))
    if origin.is_test and not allow_test_model:
        raise KstoryError("this run is a test artefact, not a Kolors LoRA: " + "; ".join(origin.reasons),
                          path=run_dir / "story" / "manifest.json",
                          fix=f"train, generate and score with the real models (--model kolors, --aesthetic-model "
                              f"kolors-challenge), or pass {ALLOW_FLAG} to package it labelled as a test artefact")
    gate = scores.get("summary", {}).get("gate")
    if gate != "pass" and not allow_failed_gate:
        raise KstoryError(
            f"the score gate did not pass (gate: {gate}, mean {scores.get('summary', {}).get('mean')}, "
            f"threshold {scores.get('summary', {}).get('threshold')})",
            path=run_dir / "scores.json",
            fix="improve the frames (kstory story --frames N with new seeds) or pass --allow-failed-gate",
        )
    out = Path(out).resolve() if out is not None else run_dir / "submission"
    if out.exists():
        from kstory.core.rundir import RunDir, move_to_history

        if out.parent != run_dir:
            raise KstoryError("the output folder exists", path=out, fix="choose another --out or remove it")
        moved = move_to_history(RunDir(run_dir), out)
        log.info("moved the previous package to %s", moved)
    trigger = lora_meta.get("kstory.trigger_word", "") or manifest.get("trigger_word", "")
    description = description or (
        f"A Kolors style LoRA: {manifest.get('title') or 'an 8-frame story'}, "
        f"{len(manifest['frames'])} frames generated with the LoRA and ControlNet guides."
    )
    recorded = (manifest.get("lora") or {})
    scale = float(recorded.get("scale") or 1.0)
    strength = float(recorded.get("strength") or float(lora_meta["kstory.alpha"]) / int(lora_meta["kstory.rank"]) * scale)
    training = _training_summary(run_dir, lora_meta)
    checkpoint = recorded.get("checkpoint")
    if checkpoint:
        training["checkpoint"] = checkpoint
    # The dashboard's choices (story/review.json): the frames go out in the chosen order, locked ones as they are.
    choices = review.load(story)
    if choices.checkpoint != checkpoint:
        log.warning("the picked checkpoint (%s) is not the LoRA the story was made with (%s): the package ships the "
                    "story's; run `kstory run` to make the story with the pick", choices.checkpoint or "none",
                    checkpoint or "lora/lora.safetensors")
    order = choices.ordered(list(manifest["frames"]))
    shipped, renames = _in_order(manifest, order)
    names = {Path(old).name: Path(new).name for old, new in renames.items() if old.startswith("frames/")}
    shipped_scores = _scores_in_order(scores, names)
    with atomic_directory(out) as staging:
        exports = export_lora(lora, staging)
        user_loras = ship_user_loras(shipped, staging)  # the user's own LoRAs: shipped only when allowed
        for old, new in renames.items():
            copy_file(story / old, staging / new)
        copy_file(story / "story.yaml", staging / "story.yaml")
        write_json(staging / "manifest.json", shipped)
        write_json(staging / "scores.json", shipped_scores)
        export_candidates(story, manifest, staging)  # the best-of-N search's record, when there was one
        write_text(staging / "README.md", _readme(
            name, description=description, trigger=trigger, training=training, manifest=shipped,
            scores=shipped_scores, strength=strength, license_id=license_id, origin=origin,
            other_loras=model_card_section(user_loras)))
        write_json(staging / "configuration.json", {
            "framework": "Pytorch", "task": TASK, **origin.to_json(),
            "score_gate": {"gate": gate, "mean": scores.get("summary", {}).get("mean"),
                           "threshold": scores.get("summary", {}).get("threshold"),
                           "overridden": gate != "pass"},
            "model": {"type": "lora", "files": {fmt: p.name for fmt, p in exports.items()}},
            "lora": {"rank": training["rank"], "alpha": training["alpha"], "scale": scale, "strength": strength,
                     "trigger_word": trigger},
        })
        write_text(staging / FORUM_FILE, _forum_post(name, owner, description, trigger, scores, origin))
        files = sorted(p.relative_to(staging).as_posix() for p in staging.rglob("*") if p.is_file())
        write_json(staging / PACKAGE_FILE, {
            "format": FORMAT,
            "model_name": name,
            "team": team,
            "suffix": suffix,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run": run_dir.name,
            "gate": gate,
            "allow_failed_gate": bool(allow_failed_gate),
            **origin.to_json(),
            "allow_test_model": bool(allow_test_model),
            "lora_files": dict(FILE_NAMES),
            "lora_checkpoint": checkpoint,
            "loras": user_loras,
            # package frame number -> the story's frame number (the order chosen on the dashboard)
            "story_frames": {key: frame["story_frame"] for key, frame in shipped["frames"].items()},
            "locked_frames": [key for key, frame in shipped["frames"].items()
                              if str(frame["story_frame"]) in choices.locked],
            # Kolors-Inpainting UNets the repairs used: not shipped, named by fingerprint (verify finds them so)
            "inpaint_models": _inpaint_models(shipped),
            "forum_title": FORUM_TITLE.format(name=name),
            "files": {rel: sha256_file(staging / rel) for rel in files},
        })
    log.info("packaged %s into %s", name, out)
    return out


def _inpaint_models(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Each distinct inpainting model the frames' repairs used, by fingerprint (never by path)."""
    seen: dict[str, dict[str, Any]] = {}
    for frame in manifest["frames"].values():
        for repair in frame.get("repairs", []):
            model = repair.get("inpaint_model")
            if model:
                seen[model["fingerprint"]] = {"kind": model["kind"], "fingerprint": model["fingerprint"],
                                              "tiny": model["tiny"]}
    return [seen[key] for key in sorted(seen)]


def read_package(submission_dir: Path) -> dict[str, Any]:
    return _read_json(Path(submission_dir) / PACKAGE_FILE, "package index", "build it with `kstory package`")


def check_files(submission_dir: Path) -> list[str]:
    """Problems with the package's files against the hashes recorded at packaging (empty when intact)."""
    submission_dir = Path(submission_dir)
    index = read_package(submission_dir)
    problems = []
    for rel, digest in index["files"].items():
        path = submission_dir / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif sha256_file(path) != digest:
            problems.append(f"{rel}: changed after packaging (sha256 mismatch)")
    known = set(index["files"]) | {PACKAGE_FILE, VERIFY_FILE}
    for path in sorted(submission_dir.rglob("*")):
        rel = path.relative_to(submission_dir).as_posix()
        if path.is_file() and rel not in known and not rel.startswith(".") and "/." not in rel:
            problems.append(f"{rel}: added after packaging")
    return problems
