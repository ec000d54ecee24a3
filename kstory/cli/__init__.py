"""The ``kstory`` command. Errors a user can fix print as one clear message, not a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

from kstory import __version__
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger, setup_console
from kstory.core.oserrors import os_fault
from kstory.core.seeds import check_seed
from kstory.core.runlog import logging_to_run
from kstory.cli.lora_args import LORA_HELP, split_loras

log = get_logger("cli")

# Exit statuses (docs/config.md, "Errors and exit statuses").
EXIT_OK = 0
EXIT_BUG = 1  # unexpected: a bug to report
EXIT_USER_ERROR = 2  # bad input, settings, or an OS refusal the user can fix; also argparse's usage errors
EXIT_GATE_FAILED = 3  # kstory score: the mean aesthetic score is below the threshold
EXIT_NOT_REPRODUCED = 4  # kstory verify: a frame did not regenerate identically
EXIT_INTERRUPTED = 130  # Ctrl-C

DESCRIPTION = """\
kstory: a Kolors LoRA style story, from dataset to published submission.

Stages talk through files in a run directory (runs/<name>/):
  data/          cleaned dataset in DiffSynth-Studio's layout + report of every drop
  lora/          lora.safetensors, checkpoints, loss.csv, validation images
  story/         frames/, guides/, story.yaml, manifest.json (seeds, hashes, everything to regenerate)
  scores.json    aesthetic score per frame, the gate, CLIP-T and CLIP-I
  submission/    the ModelScope model repo built by `kstory package`

`kstory app` opens a dashboard over the same files.
  kstory.log     everything that happened in the run, with details

Start with `kstory demo` (offline, tiny random-weight model, a few minutes on CPU),
then copy runs/demo/kstory.yaml, point it at your data and use `kstory run`;
finish with `kstory package`, `kstory verify` and `kstory upload`.
"""


def _shown(path: Path | str | None) -> str:
    """A path as the user typed its folder: relative to the working directory when it is below it."""
    if path is None:
        return ""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _cmd_demo(args: argparse.Namespace) -> int:
    from kstory.cli.demo import publish_demo, run_demo

    out = Path(args.out)
    outcomes = run_demo(out, model=args.model, images=args.images)
    steps, upload_report = publish_demo(out, any(o.status == "ran" for o in outcomes), endpoint=args.endpoint)
    print(upload_report)
    print("\nkstory demo: the whole path on the tiny random-weight preset (the pictures and scores mean nothing)")
    for outcome in outcomes:
        took = f"{outcome.seconds:5.1f} s" if outcome.status == "ran" else "      "
        print(f"  {outcome.stage:<8} {outcome.status:<10} {took}  {_shown(outcome.output)}")
    for step in steps:
        took = f"{step.seconds:5.1f} s" if step.status not in ("skipped",) else "      "
        print(f"  {step.name:<8} {step.status:<10} {took}  {_shown(step.output)}  ({step.detail})")
    print(f"look at: {out / 'story' / 'contact_sheet.png'} (the story), {out / 'data' / 'report.md'} (the data), "
          f"{out / 'submission' / 'README.md'} (the model card)")
    print(f"review:  kstory app {out}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from kstory.cli.runner import run_config

    _print_outcomes(run_config(Path(args.config), model=args.model, until=args.until,
                               use_final_lora=args.use_final_lora, upload=args.upload))
    return 0


def _cmd_prep(args: argparse.Namespace) -> int:
    from kstory.prep import prep

    with logging_to_run(args.out, "prep"):
        result = prep(
            args.input,
            Path(args.out),
            recipe=Path(args.recipe) if args.recipe else None,
            trigger_word=args.trigger_word,
            overwrite=args.overwrite,
            num_proc=args.num_proc,
            executor=args.executor,
            ray_address=args.ray_address,
        )
    dropped = ", ".join(f"{op}: {count}" for op, count in result.dropped_by.items()) or "none"
    print(f"kept {result.kept}, dropped {result.dropped} ({dropped})")
    print(f"training set: {result.metadata_csv}")
    print(f"why each sample was dropped: {result.report_md}")
    return 0


SAMPLER_CHOICES = ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde_karras", "ddim"]  # kstory.story.samplers.SAMPLERS
MEMORY_CHOICES = ["auto", "none", "24gb", "16gb", "12gb", "8gb", "cpu"]  # kstory.core.memory.PROFILES, without importing torch


def _cmd_train(args: argparse.Namespace) -> int:
    from pydantic import ValidationError
    from kstory.train import TrainSettings, train_lora

    from kstory.core.ranks import secondary_rank
    from kstory.core.rundir import set_aside
    from kstory.core.yamlio import load_model, validation_error

    settings = load_model(TrainSettings, Path(args.settings)) if args.settings else TrainSettings()
    overrides = {
        "rank": args.rank, "alpha": args.alpha, "max_steps": args.steps, "resolution": args.resolution,
        "learning_rate": args.lr, "batch_size": args.batch_size, "trigger_word": args.trigger_word,
    }
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = TrainSettings.model_validate({**settings.model_dump(exclude_unset=True), **given})
    except ValidationError as exc:  # the file was valid on its own: an option is at fault
        raise validation_error(TrainSettings, exc, {}, None,
                               names={k: name for k, name in _TRAIN_OPTIONS.items() if k in given}) from None
    out = Path(args.out)

    def train() -> Any:
        return train_lora(Path(args.data), out, settings, model=args.model,
                          cache_dir=Path(args.cache_dir) if args.cache_dir else None, memory=args.memory,
                          text_encoder_device=args.text_encoder_device, text_encoder_quant=args.text_encoder_quant)

    if secondary_rank():  # another process of a multi-process training (docs/scale-out.md): it writes no files
        train()
        return 0
    if args.fresh and out.exists():
        print(f"previous output moved to {set_aside(out)}")
    with logging_to_run(out, "train"):
        result = train()
    loss = f", final loss {result.final_loss:.4f}" if result.final_loss is not None else ""
    if result.steps == result.resumed_from:
        print(f"already trained to step {result.steps}: nothing left to train (raise --steps to continue)")
    print(f"LoRA: {result.lora_path} ({result.steps} steps{loss})")
    return 0


_TRAIN_OPTIONS = {"max_steps": "--steps", "learning_rate": "--lr", "batch_size": "--batch-size",
                  "trigger_word": "--trigger-word", "rank": "--rank", "alpha": "--alpha", "resolution": "--resolution"}


def _controlnet_args(pairs: list[str] | None) -> dict[str, str]:
    mapping = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name or not value:
            raise KstoryError(f"--controlnet {pair!r} is not NAME=PATH", fix="e.g. --controlnet pose=models/Kolors-ControlNet-Pose")
        mapping[name] = value
    return mapping


def _cmd_story(args: argparse.Namespace) -> int:
    import torch

    from kstory.story import generate_story

    from kstory.cli.stages import controlnet_paths

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    frames = parse_frames(args.frames) if args.frames else None
    lora, lora_scale, loras = split_loras(args.lora, args.lora_scale)
    with logging_to_run(args.out, "story"):
        result = generate_story(
            Path(args.spec), Path(args.out), model=args.model, lora=lora, loras=loras,
            lora_scale=lora_scale, controlnets=controlnet_paths(_controlnet_args(args.controlnet), cache_dir),
            cache_dir=cache_dir, frames=frames, memory=args.memory, text_encoder_device=args.text_encoder_device,
            text_encoder_quant=args.text_encoder_quant, ip_adapter=args.ip_adapter,
            torch_dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), ray=_ray_settings(args),
        )
    print(f"{len(result.generated)} frame(s) in {Path(args.out) / 'frames'} "
          f"({result.seconds_per_frame:.1f} s/frame); manifest: {Path(args.out) / 'manifest.json'}")
    print_story_identity(Path(args.out), cache_dir)
    return 0


def _ray_settings(args: argparse.Namespace) -> Any:
    """``--ray`` / ``--ray-workers`` as the run config's ``ray:`` section (None: in this process)."""
    from kstory.core.config import RaySettings

    if args.ray is None:
        if args.ray_workers is not None:
            raise KstoryError("--ray-workers needs --ray ADDRESS", fix="add --ray local (or auto, or HOST:PORT)")
        return None
    if args.ray_workers is not None and args.ray_workers < 1:
        raise KstoryError(f"--ray-workers {args.ray_workers}: give at least 1", fix="e.g. --ray-workers 2")
    return RaySettings(address=args.ray, workers=args.ray_workers)


def print_story_identity(story_dir: Path, cache_dir: Path | None) -> None:
    """After a story: its identity scores, when a CLIP model is at hand without a download (story cannot import
    scoring, so the command line joins the two)."""
    from kstory.scoring.identity import identity_line, local_clip, story_identity
    from kstory.scoring.story_input import story_frames

    manifest = json.loads((story_dir / "manifest.json").read_text(encoding="utf-8"))
    clip_model = local_clip(bool(manifest.get("model", {}).get("tiny")))
    if clip_model is None:
        print("identity scores: no CLIP weights on this machine; `kstory score` computes them (downloading CLIP)")
        return
    found = story_frames(story_dir)
    scores = story_identity(found.frames, [found.prompts.get(f.name) for f in found.frames], clip_model=clip_model,
                            cache_dir=cache_dir)
    note = " (tiny random-weight CLIP: the numbers mean nothing)" if clip_model == "tiny" else ""
    print(identity_line(scores) + note)


def parse_frames(text: str) -> list[int]:
    """Frame numbers from a selection like ``1,3`` or ``2-5,8`` (1-based, ranges inclusive)."""
    fix = "e.g. --frames 1,3 or --frames 2-5,8 (frame numbers start at 1)"
    frames: list[int] = []
    for part in (piece.strip() for piece in text.split(",")):
        first, dash, last = part.partition("-")
        if not (first.isdigit() and (not dash or last.isdigit())):
            raise KstoryError(f"--frames {text!r}: {part!r} is not a frame number or a range like 2-5", fix=fix)
        low, high = int(first), int(last) if dash else int(first)
        if low < 1 or high < low:
            raise KstoryError(f"--frames {text!r}: {part!r} is not a frame number or a range like 2-5", fix=fix)
        frames.extend(range(low, high + 1))
    return sorted(set(frames))


def _seed(text: str) -> int:
    """argparse type of --seed: an integer in the seed range, or a usage error."""
    try:
        return check_seed(int(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc) if text.lstrip("-").isdigit() else f"{text!r} is not a whole number") from None


def _cmd_reroll(args: argparse.Namespace) -> int:
    from kstory.story import reroll

    from kstory.cli.stages import controlnet_paths

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    if args.strength is None and (args.from_image or args.sampler):
        raise KstoryError("--from-image and --sampler are for a variation", fix="add --strength (0-1], e.g. 0.4")
    with logging_to_run(args.story, "reroll"):
        nets = controlnet_paths(_controlnet_args(args.controlnet), cache_dir) or None
        if args.strength is not None:
            from kstory.story.repair_frame import repair_frame

            repair_frame(Path(args.story), args.frame, kind="img2img", strength=args.strength, seed=args.seed,
                         prompt=args.prompt, from_image=Path(args.from_image) if args.from_image else None,
                         sampler=args.sampler, controlnets=nets, cache_dir=cache_dir)
        else:
            reroll(Path(args.story), args.frame, seed=args.seed, prompt=args.prompt, controlnets=nets,
                   cache_dir=cache_dir, ip_adapter=args.ip_adapter)
    print(f"frame {args.frame} regenerated; tried seeds are in {Path(args.story) / 'manifest.json'} (seed_history)")
    return 0


def _cmd_inpaint(args: argparse.Namespace) -> int:
    from kstory.story.repair_frame import repair_frame

    from kstory.cli.stages import controlnet_paths

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    with logging_to_run(args.story, "inpaint"):
        repair_frame(Path(args.story), args.frame, kind="inpaint", strength=args.strength, seed=args.seed,
                     prompt=args.prompt, mask=Path(args.mask), feather=args.feather, crop_padding=args.crop_padding,
                     threshold=args.threshold, sampler=args.sampler,
                     controlnets=controlnet_paths(_controlnet_args(args.controlnet), cache_dir) or None,
                     cache_dir=cache_dir, inpaint_model=args.inpaint_model)
    print(f"frame {args.frame} inpainted; the repair is recorded in {Path(args.story) / 'manifest.json'} (repairs)")
    return 0


def _cmd_search(args: argparse.Namespace) -> int:
    from kstory.cli.search import run_search

    return run_search(args)


def _cmd_score(args: argparse.Namespace) -> int:
    from kstory.scoring import exit_status, load_prompts, render_table, score_images
    from kstory.scoring.story_input import story_folder, story_frames

    images = [Path(item) for item in args.images]
    prompts = load_prompts(Path(args.prompts)) if args.prompts else None
    out = Path(args.out) if args.out else None
    story = story_folder(images[0]) if len(images) == 1 else None
    if story is not None:  # a run or story folder: the manifest's frames and prompts, into RUN/scores.json
        found = story_frames(story)
        images, prompts, out = found.frames, prompts or found.prompts, out or found.scores_path
    # Only a scores.json written into a run is logged there; scoring loose images writes into no run.
    with logging_to_run(out, "score") if out is not None else contextlib.nullcontext():
        report = score_images(
            images,
            aesthetic_model=args.aesthetic_model,
            aesthetic_clip=args.aesthetic_clip,
            clip_model=None if args.clip_model == "none" else args.clip_model,
            prompts=prompts,
            threshold=args.threshold,
            batch_size=args.batch_size,
            out=out,
            dreamsim=args.dreamsim,
            device=args.device,
            cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        )
    if not report.images:
        raise KstoryError(f"none of the {len(report.skipped)} file(s) given is an image that could be scored",
                          path=Path(args.images[0]),
                          fix="point at a run (runs/NAME), its story folder, or the frame images themselves")
    print(render_table(report))
    if out is not None:
        print(f"scores: {out}")
    return exit_status(report)


def _cmd_package(args: argparse.Namespace) -> int:
    from kstory.submissions import build_package

    with logging_to_run(Path(args.out) if args.out else Path(args.run) / "submission", "package"):
        out = build_package(
            Path(args.run), team=args.team, suffix=args.suffix, allow_failed_gate=args.allow_failed_gate,
            out=Path(args.out) if args.out else None, description=args.description, owner=args.owner,
            allow_test_model=args.allow_test_model,
        )
    print(f"package: {out} (check it with `kstory verify {out}`, then `kstory upload {out} --model-id OWNER/NAME`)")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from kstory.submissions import verify_package

    from kstory.cli.stages import controlnet_paths

    from kstory.submissions.verify_record import write_verify_record

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    with logging_to_run(args.submission, "verify"):
        report = verify_package(
            Path(args.submission), model=args.model, cache_dir=cache_dir,
            controlnets=controlnet_paths(_controlnet_args(args.controlnet), cache_dir) or None,
            rescore=not args.no_rescore, ip_adapter=args.ip_adapter, inpaint_model=args.inpaint_model,
            loras=[Path(path) for path in args.lora or []],
        )
        if report.verdict != "modified":  # a changed package gets no record: upload refuses it anyway
            write_verify_record(Path(args.submission), report)
    print(report.render())
    return EXIT_OK if report.passed else EXIT_NOT_REPRODUCED


def _cmd_upload(args: argparse.Namespace) -> int:
    from kstory.submissions import upload_package

    with logging_to_run(args.submission, "upload"):
        result = upload_package(
            Path(args.submission), args.model_id, visibility=args.visibility, dry_run=args.dry_run,
            endpoint=args.endpoint, retries=args.retries, commit_message=args.message,
            allow_test_model=args.allow_test_model, allow_failed_gate=args.allow_failed_gate,
            allow_failed_verify=args.allow_failed_verify,
        )
    print(result.render())
    return 0


def _cmd_app(args: argparse.Namespace) -> int:
    from kstory.cli.launch import launch, locate_run

    run, runs_root = locate_run(args.run, Path(args.runs_root) if args.runs_root else None)
    return launch(run, runs_root, args.port)


def _cmd_model(args: argparse.Namespace) -> int:
    from kstory.core.models import resolve_model

    if args.spec == "random-full":
        return _random_full(args)
    if args.out is not None:
        raise KstoryError(f"unexpected argument {args.out!r}: only 'random-full' takes an output folder",
                          fix=f"kstory model {args.spec}")
    weights = resolve_model(args.spec, cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    print(f"identity:     {weights.identity}")
    print(f"text encoder: {weights.text_encoder}")
    print(f"unet:         {weights.unet}")
    print(f"vae:          {weights.vae}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from kstory.cli.status import render_status

    run = Path(args.run)
    if not run.is_dir():
        raise KstoryError("no such run folder", path=run, fix="pass a run directory, e.g. runs/demo")
    print(render_status(run))
    return EXIT_OK


def _random_full(args: argparse.Namespace) -> int:
    if args.out is None:
        raise KstoryError("random-full needs an output folder", fix="kstory model random-full OUT")
    out = Path(args.out)
    if out.exists():
        raise KstoryError("output folder already exists", path=out, fix="pick a new folder or delete this one")
    from kstory.core.models.random_full import write_random_kolors

    write_random_kolors(out, seed=args.seed, layout=args.layout)
    print(f"random-weight Kolors ({args.layout} layout, seed {args.seed}): {out}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    from kstory.core.doctor import report

    print(report())
    return 0


def _print_outcomes(outcomes) -> None:
    for outcome in outcomes:
        took = f" in {outcome.seconds:.1f} s" if outcome.status == "ran" else ""
        print(f"{outcome.stage:<8} {outcome.status}{took} -> {outcome.output}")


def _add_common(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default, help="show debug messages on the terminal")
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show tracebacks instead of short error messages")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kstory", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"kstory {__version__}")
    _add_common(parser, default=False)
    # every subcommand takes them too; SUPPRESS keeps the subcommand from resetting a value given before it
    common = argparse.ArgumentParser(add_help=False)
    _add_common(common, default=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[common], help="run the whole pipeline offline on a generated dataset and the tiny model",
        description="Generate a small style dataset, write runs/demo/kstory.yaml and walk the whole path on it: "
        "prep, train, story, score (skipping stages that are up to date), then package (with the gate and "
        "test-model overrides the random weights need, shown in the model card), verify, an upload dry run, and "
        "a contact sheet of the story. Ends with a summary of each step's time and output.",
    )
    demo.add_argument("--out", default="runs/demo", help="run directory to create or resume (default: runs/demo)")
    demo.add_argument("--model", default="tiny", help="base model: tiny (default, offline), kolors, or a local folder")
    demo.add_argument("--images", type=int, default=24, help="size of the generated dataset (default: 24)")
    demo.add_argument("--endpoint", help="upload the demo package to this hub (e.g. a local stand-in); "
                      "default: a dry run that lists every file it would send")
    demo.set_defaults(func=_cmd_demo)

    run = commands.add_parser(
        "run", parents=[common], help="run every stage of a config, resuming at the first one not up to date",
        description="Run the stages in order from one YAML config (see docs/config.md). A stage whose output "
        "matches the current settings and inputs is skipped; a stale output is moved to RUN/.history/, "
        "never overwritten.",
    )
    run.add_argument("config", help="run config YAML (e.g. runs/demo/kstory.yaml)")
    run.add_argument("--model", default=None, help="override the config's base model")
    run.add_argument("--until", metavar="STAGE", help="stop after this stage (e.g. prep)")
    run.add_argument("--use-final-lora", action="store_true",
                     help="clear the checkpoint picked on the dashboard (story/review.json) and make the story "
                          "with lora/lora.safetensors")
    run.add_argument("--upload", action="store_true",
                     help="also upload the package (the config's upload: section names the model); without it, "
                          "only upload.enabled: true uploads")
    run.set_defaults(func=_cmd_run)

    prep = commands.add_parser(
        "prep", parents=[common], help="clean an image-caption dataset with Data-Juicer into DiffSynth's training layout",
        description="Validate and clean INPUT with a Data-Juicer recipe; write OUT/train/metadata.csv with the "
        "kept images, and OUT/report.json + OUT/report.md explaining every dropped sample (see docs/data-prep.md).",
    )
    prep.add_argument("input", help="folder of images with metadata.csv/.jsonl or sidecar .txt captions, "
                      "or modelscope://OWNER/NAME")
    prep.add_argument("--out", required=True, help="output folder (refused if it holds a previous run)")
    prep.add_argument("--recipe", help="Data-Juicer recipe YAML (default: the shipped kstory/prep/recipes/default.yaml)")
    prep.add_argument("--trigger-word", help="put this word at the front of every caption")
    prep.add_argument("--overwrite", action="store_true", help="replace a previous output (swapped in atomically)")
    prep.add_argument("--num-proc", type=int, default=1, help="Data-Juicer worker processes (default: 1)")
    prep.add_argument("--executor", choices=["default", "ray"], default="default",
                      help="Data-Juicer executor: default (in this process) or ray (see docs/scale-out.md)")
    prep.add_argument("--ray-address", default="local",
                      help="with --executor ray: local (start Ray here), auto (join `ray start`) or HOST:PORT")
    prep.set_defaults(func=_cmd_prep)

    train = commands.add_parser(
        "train", parents=[common], help="train a Kolors LoRA on a prepared dataset (resumes an interrupted run)",
        description="Train a LoRA on DATA (the output of `kstory prep`) into OUT: lora.safetensors with its "
        "settings in the metadata, resumable checkpoints, loss.csv and validation images (see docs/train.md). "
        "Running it again on the same OUT resumes from the newest checkpoint; Ctrl-C saves one first.",
    )
    train.add_argument("data", help="prepared dataset folder (holds train/metadata.csv)")
    train.add_argument("--out", required=True, help="output folder (e.g. runs/mine/lora)")
    train.add_argument("--model", default="tiny", help="base model: tiny (default, offline), kolors, or a local folder")
    train.add_argument("--settings", help="YAML file of training settings (the `train:` section of a run config)")
    train.add_argument("--rank", type=int, help="LoRA rank (default 4)")
    train.add_argument("--alpha", type=float, help="LoRA alpha (default: rank, i.e. strength 1)")
    train.add_argument("--steps", type=int, help="optimizer steps (default 500)")
    train.add_argument("--resolution", type=int, help="training resolution, multiple of 64 (default 1024)")
    train.add_argument("--lr", type=float, help="learning rate (default 1e-4)")
    train.add_argument("--batch-size", type=int, help="images per batch (default 1)")
    train.add_argument("--trigger-word", help="put this word in front of captions that lack it")
    train.add_argument("--fresh", action="store_true", help="move an existing OUT aside and start over")
    train.add_argument("--cache-dir", help="model and latent cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    train.add_argument("--memory", default="auto", choices=MEMORY_CHOICES,
                       help="memory profile (default auto: picked from the free memory; see docs/performance.md)")
    train.add_argument("--text-encoder-device", default="auto", choices=["auto", "cpu"],
                       help="cpu: encode captions on the CPU (default: as the memory profile says)")
    train.add_argument("--text-encoder-quant", default="none", choices=["none", "int8", "int4"],
                       help="ChatGLM's linear weights as integers (torchao, pip install \"kstory[quant]\"): int8 halves "
                       "its memory with a small embedding error (docs/performance.md)")
    train.set_defaults(func=_cmd_train)

    story = commands.add_parser(
        "story", parents=[common], help="generate the story's frames from a spec, with the LoRA and ControlNet guides",
        description="Generate every frame of SPEC (docs/story.md) into OUT: frames/NN.png, guides/, story.yaml and "
        "manifest.json with everything needed to regenerate each frame bit for bit.",
    )
    story.add_argument("spec", help="story spec YAML")
    story.add_argument("--out", required=True, help="output folder (e.g. runs/mine/story)")
    story.add_argument("--model", default="tiny", help="base model: tiny (default, offline), kolors, or a local folder")
    story.add_argument("--lora", action="append", metavar="PATH[:SCALE]", help=LORA_HELP)
    story.add_argument("--lora-scale", type=float, help="strength of the LoRA from `kstory train` (default: as "
                       "trained, 1.0)")
    story.add_argument("--controlnet", action="append", metavar="NAME=PATH",
                       help="ControlNet weights for the spec's guides (repeatable); PATH may be 'tiny' (offline, random)")
    story.add_argument("--ip-adapter", metavar="PATH", help="Kolors-IP-Adapter-Plus folder for the spec's character reference (overrides its adapter:); 'tiny' for the offline random one")
    story.add_argument("--frames", help="only these frames, e.g. 1,3 or 2-5 (the others are kept)")
    story.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    story.add_argument("--memory", default="auto", choices=MEMORY_CHOICES,
                       help="memory profile (default auto: picked from the free memory; see docs/performance.md)")
    story.add_argument("--text-encoder-device", default="auto", choices=["auto", "cpu"],
                       help="cpu: encode prompts on the CPU (default: as the memory profile says)")
    story.add_argument("--text-encoder-quant", default="none", choices=["none", "int8", "int4"],
                       help="ChatGLM's linear weights as integers (torchao, pip install \"kstory[quant]\"): int8 halves "
                       "its memory with a small embedding error (docs/performance.md)")
    story.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                       help="weights' dtype (default: the profile's; fp16 on a GPU, float32 or bf16 on the CPU)")
    story.add_argument("--ray", metavar="ADDRESS", help="denoise the batches on Ray workers, one loaded model each: "
                       "local, auto or HOST:PORT (docs/scale-out.md); the frames are the same")
    story.add_argument("--ray-workers", type=int, metavar="N", help="with --ray: workers (default: one per GPU, or "
                       "one per CPU)")
    story.set_defaults(func=_cmd_story)

    reroll = commands.add_parser(
        "reroll", parents=[common], help="regenerate one frame with a new seed or prompt, keeping the other frames",
        description="Regenerate frame FRAME of the story in STORY (a `kstory story` output) with --seed, --prompt, "
        "or neither (a fresh seed). The other frames are not touched; every tried seed stays in the manifest.",
    )
    reroll.add_argument("story", help="story folder (holds manifest.json)")
    reroll.add_argument("frame", type=int, help="frame number, 1-based")
    reroll.add_argument("--seed", type=_seed, help="new seed (0 to 2**63-1)")
    reroll.add_argument("--prompt", help="new prompt for this frame")
    reroll.add_argument("--strength", type=float, help="a variation of the current picture: how much to change "
                        "(0-1]; 0.3-0.5 keeps the composition. Without it the frame is made afresh")
    reroll.add_argument("--from-image", help="with --strength: start from this picture instead of the frame")
    reroll.add_argument("--sampler", choices=SAMPLER_CHOICES, help="with --strength: sampler (default: the frame's)")
    reroll.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="moved ControlNet weights")
    reroll.add_argument("--ip-adapter", metavar="PATH", help="moved IP-Adapter (found by hash)")
    reroll.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    reroll.set_defaults(func=_cmd_reroll)

    inpaint = commands.add_parser(
        "inpaint", parents=[common], help="repaint the masked part of one frame, keeping the rest of it",
        description="Repaint the white part of MASK in frame FRAME of the story in STORY with the story's model and "
        "LoRA (latent blending); pixels farther than --feather from the mask stay exactly as they are. The repair "
        "(mask, strength, seed, prompt, sampler) is recorded in the manifest, `kstory verify` replays it and "
        "`kstory package` ships the mask. A mask of another size is resized, a grey one thresholded, an all-white "
        "one repaints the whole frame (a full re-roll at --strength).",
    )
    inpaint.add_argument("story", help="story folder (holds manifest.json)")
    inpaint.add_argument("frame", type=int, help="frame number, 1-based")
    inpaint.add_argument("--mask", required=True, help="picture: white = repaint, black = keep")
    inpaint.add_argument("--prompt", help="prompt for the repainted part (default: the frame's)")
    inpaint.add_argument("--seed", type=_seed, help="seed (default: a fresh one)")
    inpaint.add_argument("--strength", type=float, default=1.0, help="how much to change (0-1], default 1")
    inpaint.add_argument("--feather", type=int, default=8, help="soft edge in pixels outside the mask (default 8)")
    inpaint.add_argument("--crop-padding", type=int, help="inpaint only the box around the mask plus this many "
                         "pixels, at the frame's full resolution (for small masks)")
    inpaint.add_argument("--threshold", type=int, default=128, help="grey level from which a mask pixel counts "
                         "as white (default 128)")
    inpaint.add_argument("--sampler", choices=SAMPLER_CHOICES, help="sampler (default: the frame's)")
    inpaint.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="moved ControlNet weights")
    inpaint.add_argument("--inpaint-model", metavar="PATH", help="inpaint with the Kwai-Kolors/Kolors-Inpainting "
                         "UNet in this folder ('tiny': the offline random one) instead of latent blending")
    inpaint.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    inpaint.set_defaults(func=_cmd_inpaint)

    search = commands.add_parser(
        "search", parents=[common], help="best-of-N seeds per frame, scored; keeps the set that clears the gate best "
        "(exit 0 goal met, 3 not)",
        description="Render N candidate seeds per frame of an existing story (derived from each frame's seed; "
        "locked frames untouched), score each (aesthetic, CLIP-T, identity) and pick the set that reaches the gate "
        "plus a margin with every frame on the CLIP-T floor, most alike, then most aesthetic (docs/story.md). Stops "
        "as soon as the goal is met; Ctrl-C keeps every finished candidate and the next run continues.",
    )
    from kstory.cli.search import add_search_arguments

    add_search_arguments(search)
    search.set_defaults(func=_cmd_search)

    score = commands.add_parser(
        "score", parents=[common], help="the challenge's aesthetic gate (exit 0 pass, 3 fail), plus coherence and prompt fit",
        description="Score images with the organisers' aesthetic predictor (same numbers, batched), CLIP-T against "
        "their prompts and CLIP-I between them; write scores.json (see docs/scoring.md). Exit status: 0 when the "
        "mean aesthetic score reaches the threshold, 3 when it does not, 2 on bad input.",
    )
    score.add_argument("images", nargs="+", help="a run folder or its story folder (the manifest's frames and "
                       "prompts, scores into RUN/scores.json), or image files and/or folders (every file directly inside)")
    score.add_argument("--aesthetic-model", default="tiny",
                       help="kolors-challenge (download the organisers' predictor), a predictor folder, LAION's MLP "
                       ".pth, or tiny (offline, random: its scores mean nothing) (default: tiny)")
    score.add_argument("--aesthetic-clip", default="ViT-L-14:openai",
                       help="open_clip tower for LAION's .pth form (default: ViT-L-14:openai, QuickGELU forced)")
    score.add_argument("--clip-model", default="auto",
                       help="open_clip model for CLIP-T/CLIP-I: NAME:tag, NAME:/path/weights, a folder, tiny, "
                       "or none (default: auto = tiny with the tiny predictor, else ViT-L-14:openai; when auto's weights "
                       "cannot be had, a warning and aesthetics only: the gate still applies)")
    score.add_argument("--prompts", help="JSON file mapping image file names to their prompts (for CLIP-T)")
    score.add_argument("--threshold", type=float, default=6.0, help="gate on the mean aesthetic score (default: 6)")
    score.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    score.add_argument("--out", help="write scores.json here (default for a run or story folder: RUN/scores.json)")
    score.add_argument("--dreamsim", action="store_true", help="also DreamSim distances (needs `pip install dreamsim`)")
    score.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    score.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    score.set_defaults(func=_cmd_score)

    package = commands.add_parser(
        "package", parents=[common], help="build the ModelScope model repo: model card, LoRA in 3 formats, frames, manifest, scores",
        description="Build RUN/submission/ (docs/submissions.md): README.md model card, configuration.json, the LoRA "
        "in DiffSynth, diffusers and kohya formats, the frames and guides, story.yaml, manifest.json, scores.json "
        "and forum_post.md. The model name is <team>-可图Kolors训练-<suffix>. Refuses a failed gate unless told.",
    )
    package.add_argument("run", help="run directory (e.g. runs/mine)")
    package.add_argument("--team", required=True, help="team name (first part of the model name)")
    package.add_argument("--suffix", required=True, help="last part of the model name")
    package.add_argument("--description", help="style description for the model card")
    package.add_argument("--owner", help="ModelScope owner, for the snippets in the model card")
    package.add_argument("--out", help="package folder (default: RUN/submission)")
    package.add_argument("--allow-failed-gate", action="store_true", help="package even if the mean score is below the gate")
    package.add_argument("--allow-test-model", action="store_true",
                         help="package a run made with the tiny/random-weight model or scorer, or a LoRA not on Kolors, "
                         "labelled as a test artefact")
    package.set_defaults(func=_cmd_package)

    verify = commands.add_parser(
        "verify", parents=[common], help="regenerate every frame from the package alone and compare (exit 4 when not identical)",
        description="Check every file's hash, regenerate each frame from the package (manifest, LoRA, guides, base "
        "model) and report identical or the PSNR/SSIM difference, then re-score and compare with scores.json.",
    )
    verify.add_argument("submission", help="package folder (e.g. runs/mine/submission)")
    verify.add_argument("--model", default="tiny", help="base model the story was made with: tiny, kolors, or a folder")
    verify.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="ControlNet weights (found by hash)")
    verify.add_argument("--ip-adapter", metavar="PATH", help="IP-Adapter the story used (found by hash)")
    verify.add_argument("--lora", action="append", metavar="PATH",
                        help="a LoRA the frames were made with that the package records but does not ship (its "
                        "licence was not marked as allowing it); found by its sha256 (repeatable)")
    verify.add_argument("--inpaint-model", metavar="PATH", help="Kolors-Inpainting folder the repairs used "
                        "(found by hash; default: where they recorded it)")
    verify.add_argument("--no-rescore", action="store_true", help="skip re-scoring")
    verify.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    verify.set_defaults(func=_cmd_verify)

    upload = commands.add_parser(
        "upload", parents=[common], help="upload a package to ModelScope (token from $MODELSCOPE_API_TOKEN or a hidden prompt)",
        description="Create the model if missing and upload the package folder with the modelscope client. The "
        "token is read from $MODELSCOPE_API_TOKEN or asked for without echo; it is never written anywhere. "
        "Running it again after an interruption completes the upload without duplicates.",
    )
    upload.add_argument("submission", help="package folder")
    upload.add_argument("--model-id", required=True, help="OWNER/<team>-可图Kolors训练-<suffix>")
    upload.add_argument("--visibility", default="public", choices=["public", "private", "internal"],
                        help="visibility of a newly created model (default: public)")
    upload.add_argument("--dry-run", action="store_true", help="list what would be sent, send nothing")
    upload.add_argument("--message", help="commit message")
    upload.add_argument("--retries", type=int, default=3, help="retries on transient failures (default: 3)")
    upload.add_argument("--endpoint", help="hub endpoint (default: ModelScope's)")
    upload.add_argument("--allow-test-model", action="store_true", help="upload a package labelled as a test artefact")
    upload.add_argument("--allow-failed-gate", action="store_true", help="upload a package whose score gate failed")
    upload.add_argument("--allow-failed-verify", action="store_true",
                        help="upload a package whose last `kstory verify` failed")
    upload.set_defaults(func=_cmd_upload)

    app = commands.add_parser(
        "app", parents=[common], help="the review dashboard: data, training, story, scores, package and upload (localhost only)",
        description="Start the Streamlit dashboard on 127.0.0.1 (docs/app.md). It reads and writes the run "
        "directory only through the stages' documented files; typed paths stay inside the runs root.",
    )
    app.add_argument("run", nargs="?", help="run to open: a path (e.g. runs/demo) or a name in the runs root (demo)")
    app.add_argument("--runs-root", help="folder holding run directories (default: runs, or the parent of a run "
                     "path given outside it)")
    app.add_argument("--port", type=int, help="port (default: Streamlit's, 8501)")
    app.set_defaults(func=_cmd_app)

    model = commands.add_parser(
        "model", parents=[common], help="resolve a base model (download, build or check it) and print its files",
        description="SPEC is 'kolors' (download Kwai-Kolors/Kolors from ModelScope into the cache), 'tiny' "
        "(build the tiny random-weight Kolors offline) or a local folder in the published layout. "
        "'random-full OUT' writes a full-size random-weight Kolors (17 GB, fp16) to OUT for benchmarks.",
    )
    model.add_argument("spec", help="kolors, tiny, a folder, or random-full")
    model.add_argument("out", nargs="?", help="output folder (random-full only)")
    model.add_argument("--seed", type=int, default=0, help="random-full: seed of the weights (default 0)")
    model.add_argument("--layout", choices=("official", "diffusers", "single"), default="official",
                       help="random-full: file layout (default: official, as Kwai-Kolors/Kolors)")
    model.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")
    model.set_defaults(func=_cmd_model)

    status = commands.add_parser(
        "status", parents=[common], help="what is running or failed in a run, and whether each stage is up to date",
        description="Print the run's current writer (RUN/.lock.json), its recent jobs from RUN/.jobs/ (started by "
        "the dashboard: state, progress, error) and each stage's state from its stamp: up to date, out of date "
        "(kstory.yaml or the inputs changed), unfinished (interrupted; `kstory run` resumes it), missing.",
    )
    status.add_argument("run", help="run directory (e.g. runs/demo)")
    status.set_defaults(func=_cmd_status)

    doctor = commands.add_parser(
        "doctor", parents=[common], help="print versions and environment facts for bug reports")
    doctor.set_defaults(func=_cmd_doctor)
    return parser


def _written_run(args: argparse.Namespace) -> Path | None:
    """The run folder a command writes into (its lock is held while it runs), or None."""
    from kstory.core.runlock import run_folder_for

    if args.command == "run":
        from kstory.core.config import load_config

        return Path(load_config(Path(args.config)).run_dir)
    if args.command == "demo":
        return Path(args.out)
    if args.command == "package":
        return Path(args.run)
    if args.command == "score" and not args.out and len(args.images) == 1:
        from kstory.scoring.story_input import story_folder

        story = story_folder(Path(args.images[0]))  # `kstory score RUN`: writes RUN/scores.json
        return story.parent if story is not None else None
    if args.command in ("verify", "upload"):
        return run_folder_for(Path(args.submission))  # RUN/submission: verify.json, the run's log
    if args.command == "search":
        from kstory.submissions.search import story_dir_of

        return run_folder_for(story_dir_of(Path(args.run)))
    output = {"prep": "out", "train": "out", "story": "out", "reroll": "story", "score": "out"}.get(args.command)
    value = getattr(args, output, None) if output else None
    return run_folder_for(value) if value else None


def main(argv: list[str] | None = None) -> int:
    import shlex

    from kstory.core.ranks import secondary_rank
    from kstory.core.runlock import run_lock

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_console(verbose=args.verbose, debug=args.debug)
    logging.raiseExceptions = bool(args.debug)  # a log file on a full disk: no traceback per record on the terminal
    try:
        written = None if secondary_rank() else _written_run(args)  # a training's other processes write nothing
        with run_lock(written, "kstory " + shlex.join(sys.argv[1:] if argv is None else argv)):
            return args.func(args)
    except KstoryError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc.render()}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted: finished outputs are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - last resort: no traceback for users unless asked
        if args.debug:
            traceback.print_exc()
        # read-only, permissions, full disk, long path: the user's to fix, not a bug
        fault = os_fault(exc, near=getattr(args, "out", None))
        if fault is not None:
            get_logger().debug("%s", fault.message, exc_info=True)
            print(f"error: {fault.render()}", file=sys.stderr)
            logging.shutdown()
            return EXIT_USER_ERROR
        get_logger().debug("unexpected error", exc_info=True)
        print(f"error: unexpected {type(exc).__name__}: {exc}\n"
              "run again with --debug for the traceback, and please report it", file=sys.stderr)
        logging.shutdown()
        return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
