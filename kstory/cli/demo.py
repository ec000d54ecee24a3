"""``kstory demo``: the whole pipeline on the tiny preset, offline, on data it makes itself."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from kstory.core import atomic
from kstory.core.logs import get_logger
from kstory.core.rundir import RunDir
from kstory.cli.runner import StageOutcome, run_config

log = get_logger("demo")

DEMO_TRIGGER = "kstory style"
DATASET_FOLDER = "style-dataset"
STORY_SPEC = "story.yaml"


def demo_config(run_dir: Path, *, model: str = "tiny", images: int = 24) -> dict:
    """The demo's run config; paths are relative to the run directory, where it is saved."""
    return {
        "name": run_dir.name,
        "runs_root": "..",
        "model": model,
        "seed": 0,
        "prep": {
            "source": f"inputs/{DATASET_FOLDER}",
            "trigger_word": DEMO_TRIGGER,
        },
        # Small enough for a CPU in well under a minute; a real run keeps the
        # defaults (1024 px, 500 steps) and raises rank to 8-32.
        "train": {
            "rank": 4,
            "resolution": 128,
            "max_steps": 12,
            "learning_rate": 1e-3,
            "checkpoint_every": 6,
            "validation_prompts": [
                {"prompt": f"{DEMO_TRIGGER}, a fox waving next to a tree", "seed": 1},
                {"prompt": f"{DEMO_TRIGGER}, a cat sitting by a house at night", "seed": 2},
            ],
            "validation_steps": 4,
        },
        # Eight 128 px frames with the built-in poses and a canny guide, through
        # tiny random ControlNets of both kinds (official Kolors and SDXL Union).
        "story": {
            "spec": f"inputs/{STORY_SPEC}",
            "controlnets": {"pose": "tiny", "union": "tiny"},
        },
        "score": {"aesthetic_model": "tiny", "clip_model": "tiny"},
    }


def prepare_demo_run(out: Path, *, model: str = "tiny", images: int = 24) -> Path:
    """Write the demo's dataset, story spec and config under ``out`` (each once); returns the config path.

    The config runs as it is (``kstory run OUT/kstory.yaml``): every path it names exists.
    """
    from kstory.prep.synthetic import make_style_dataset
    from kstory.story import make_demo_spec

    run = RunDir(Path(out).resolve()).ensure()
    dataset = run.inputs / DATASET_FOLDER
    if not dataset.exists():
        log.info("demo: generating a %d-image style dataset in %s", images, dataset)
        make_style_dataset(dataset, n=images, seed=0)
    spec = run.inputs / STORY_SPEC
    if not spec.exists():
        make_demo_spec(spec, DEMO_TRIGGER)
    if run.config.exists():
        log.info("demo: using the existing config %s (delete it to start from the defaults)", run.config)
    else:
        text = "# kstory demo run: edit and run again with `kstory run` on this file.\n"
        text += yaml.safe_dump(demo_config(run.root, model=model, images=images), sort_keys=False)
        atomic.write_text(run.config, text)
    return run.config


def run_demo(out: Path = Path("runs/demo"), *, model: str = "tiny", images: int = 24) -> list[StageOutcome]:
    """Generate the demo dataset and config under ``out`` (once), then run every stage."""
    return run_config(prepare_demo_run(out, model=model, images=images), model=model, until="score")


DEMO_TEAM, DEMO_SUFFIX, DEMO_OWNER = "kstory", "demo", "kstory-demo"


@dataclass(frozen=True)
class DemoStep:
    """One step of the demo after the stages: what it did, how long it took, where its output is."""

    name: str
    status: str
    seconds: float
    output: Path
    detail: str = ""


def publish_demo(run_root: Path, stages_ran: bool, *, endpoint: str | None = None) -> tuple[list[DemoStep], str]:
    """Package, verify and upload (a dry run, or to ``endpoint``) the demo run, and draw its contact sheet.

    The tiny random-weight models make a test artefact whose scores fail the gate, so the package is built with
    both overrides, and its model card and configuration.json say so. Returns the steps and the upload report.
    """
    from kstory.story.contact_sheet import write_contact_sheet
    from kstory.submissions import build_package, upload_package, verify_package
    from kstory.submissions.verify_record import write_verify_record

    run = RunDir(Path(run_root).resolve())
    steps: list[DemoStep] = []
    started = time.monotonic()
    if stages_ran or not (run.submission / "kstory_package.json").is_file():
        build_package(run.root, team=DEMO_TEAM, suffix=DEMO_SUFFIX, owner=DEMO_OWNER, allow_failed_gate=True,
                      allow_test_model=True, description="The kstory demo: a random-weight test model, not a style.")
        steps.append(DemoStep("package", "ran", time.monotonic() - started, run.submission,
                              "gate and test-model overrides shown in the model card"))
        started = time.monotonic()
        report = verify_package(run.submission, model="tiny")
        write_verify_record(run.submission, report)
        same = sum(frame.identical for frame in report.frames)
        steps.append(DemoStep("verify", report.verdict, time.monotonic() - started, run.submission / "verify.json",
                              f"{same}/{len(report.frames)} frames regenerated identically from the package"))
    else:
        steps.append(DemoStep("package", "skipped", 0.0, run.submission, "the run did not change"))
    started = time.monotonic()
    name = json.loads((run.submission / "kstory_package.json").read_text(encoding="utf-8"))["model_name"]
    upload = upload_package(run.submission, f"{DEMO_OWNER}/{name}", dry_run=endpoint is None, endpoint=endpoint,
                            allow_test_model=True, allow_failed_gate=True)
    steps.append(DemoStep("upload", "dry run" if endpoint is None else "ran", time.monotonic() - started,
                          run.submission, f"{len(upload.files)} files for {DEMO_OWNER}/{name}"))
    started = time.monotonic()
    scores = json.loads(run.scores.read_text(encoding="utf-8")) if run.scores.is_file() else None
    sheet = write_contact_sheet(run.story, run.story / "contact_sheet.png", scores)
    steps.append(DemoStep("sheet", "ran", time.monotonic() - started, sheet, "the frames with guides, seeds, scores"))
    return steps, upload.render()
