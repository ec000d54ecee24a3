"""``kstory demo``: the whole pipeline on the tiny preset, offline, on data it makes itself."""

from __future__ import annotations

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
    return run_config(prepare_demo_run(out, model=model, images=images), model=model)
