"""Fingerprints of content: moved and copied runs stay up to date; train's schedule continues, never restarts."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from kstory.cli import main
from kstory.core.rundir import read_stamp
from kstory.cli.runner import run_config

STAGES = ["prep", "train", "story", "score"]


def _copy_run(source: Path, target: Path) -> Path:
    """A copy at another absolute path whose every file has a new mtime (as after a download or a plain cp)."""
    shutil.copytree(source, target)
    later = source.stat().st_mtime + 3600
    for path in [target, *target.rglob("*")]:
        os.utime(path, (later, later), follow_symlinks=False)
    return target


def _statuses(outcomes) -> dict[str, str]:
    """What each configured stage did (package and upload are not configured in these runs)."""
    return {outcome.stage: outcome.status for outcome in outcomes if outcome.status != "not configured"}


def _set_max_steps(config: Path, steps: int) -> None:
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["train"]["max_steps"] = steps
    config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def _checkpoint_steps(lora: Path) -> list[int]:
    return sorted(int(path.name.split("-")[1]) for path in (lora / "checkpoints").iterdir())


def _lora_history(run: Path) -> list[str]:
    history = run / ".history"
    return [p.name for p in history.iterdir() if p.name.startswith("lora")] if history.exists() else []


@pytest.mark.slow
def test_a_copied_run_is_up_to_date(demo_runs: Path, tmp_path: Path) -> None:
    copy = _copy_run(demo_runs / "demo", tmp_path / "elsewhere" / "demo")
    outcomes = run_config(copy / "kstory.yaml")
    assert _statuses(outcomes) == dict.fromkeys(STAGES, "skipped")
    assert all(outcome.output.is_relative_to(copy) for outcome in outcomes)


@pytest.fixture(scope="module")
def readme_run(demo_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo rearranged as the README lays a run out: runs/mine/kstory.yaml with story.yaml beside it."""
    run = _copy_run(demo_runs / "demo", tmp_path_factory.mktemp("project") / "runs" / "mine")
    for name in ("story.yaml", "story-reference.png", "story-character.png"):
        shutil.move(run / "inputs" / name, run / name)
    config = yaml.safe_load((run / "kstory.yaml").read_text(encoding="utf-8"))
    del config["runs_root"]
    config["name"] = "mine"
    config["story"]["spec"] = "story.yaml"
    (run / "kstory.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return run


@pytest.mark.slow
def test_readme_layout_second_run_skips_every_stage(readme_run: Path) -> None:
    first = run_config(readme_run / "kstory.yaml")
    assert all(outcome.output.parent == readme_run for outcome in first if outcome.status != "not configured")
    assert (readme_run / "kstory.log").is_file()  # the log lives beside the spec and must not make it stale
    second = run_config(readme_run / "kstory.yaml")
    assert _statuses(second) == dict.fromkeys(STAGES, "skipped")
    reference = readme_run / "story-reference.png"  # the canny guide's picture, referenced by the spec
    with Image.open(reference) as image:
        image = image.convert("RGB")
    image.putpixel((0, 0), (0, 0, 0))
    image.save(reference)
    statuses = _statuses(run_config(readme_run / "kstory.yaml", until="story"))
    assert statuses == {"prep": "skipped", "train": "skipped", "story": "ran"}


@pytest.mark.slow
def test_more_steps_continue_and_fewer_stop_keeping_checkpoints(readme_run: Path) -> None:
    config, lora = readme_run / "kstory.yaml", readme_run / "lora"
    before = _checkpoint_steps(lora)
    assert before[-1] == 12

    _set_max_steps(config, 14)
    assert _statuses(run_config(config, until="train"))["train"] == "ran"
    summary = json.loads((lora / "train.json").read_text(encoding="utf-8"))
    assert (summary["resumed_from"], summary["steps"]) == (12, 14)
    assert _checkpoint_steps(lora) == [*before, 14]
    assert _lora_history(readme_run) == []
    assert read_stamp(lora)["finished"] is True
    assert _statuses(run_config(config, until="train"))["train"] == "skipped"

    _set_max_steps(config, 8)
    assert _statuses(run_config(config, until="train"))["train"] == "ran"
    summary = json.loads((lora / "train.json").read_text(encoding="utf-8"))
    assert (summary["resumed_from"], summary["steps"]) == (6, 8)
    assert _checkpoint_steps(lora) == [*before[:-1], 8, 12, 14]  # the later ones are kept for a longer run
    assert _lora_history(readme_run) == []
    log = (readme_run / "kstory.log").read_text(encoding="utf-8")
    assert "later checkpoints are kept" in log and "continuing the finished output" in log
    from kstory.train.lora_io import read_lora

    assert read_lora(lora / "lora.safetensors")[1]["kstory.step"] == "8"


def test_train_twice_on_a_finished_output_is_a_no_op(demo_runs: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    run = _copy_run(demo_runs / "demo", tmp_path / "demo")
    settings = tmp_path / "train.yaml"
    config = yaml.safe_load((run / "kstory.yaml").read_text(encoding="utf-8"))
    settings.write_text(yaml.safe_dump({**config["train"], "trigger_word": config["prep"]["trigger_word"]}))
    lora = run / "lora" / "lora.safetensors"
    before = lora.read_bytes()
    for _ in range(2):
        assert main(["train", str(run / "data"), "--out", str(run / "lora"), "--settings", str(settings)]) == 0
        out = capsys.readouterr().out
        assert "already trained to step 12: nothing left to train" in out and "final loss" in out
    assert lora.read_bytes() == before


@pytest.mark.slow
def test_a_copied_story_made_again_keeps_its_folder(demo_runs: Path, tmp_path: Path) -> None:
    """The story stage run on a copy (its LoRA and inputs now at other paths) generates nothing and swaps
    nothing: the manifest's recorded places are not content."""
    from kstory.cli.stages import STAGES
    from kstory.core.config import load_config
    from kstory.core.rundir import RunDir

    copy = _copy_run(demo_runs / "demo", tmp_path / "moved" / "demo")
    manifest = json.loads((copy / "story" / "manifest.json").read_text(encoding="utf-8"))
    assert not Path(manifest["lora"]["path"]).is_relative_to(copy)  # it names the original run's LoRA
    story = next(stage for stage in STAGES if stage.name == "story")
    history_before = sorted(p.name for p in (copy / ".history").iterdir()) if (copy / ".history").exists() else []
    story.run(load_config(copy / "kstory.yaml"), RunDir(copy))
    history_after = sorted(p.name for p in (copy / ".history").iterdir()) if (copy / ".history").exists() else []
    assert history_after == history_before, "an unchanged story is not swapped into .history/"
    assert json.loads((copy / "story" / "manifest.json").read_text(encoding="utf-8")) == manifest
