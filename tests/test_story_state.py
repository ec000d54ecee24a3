"""The story folder's state: staged and atomic, re-rolls that stay, resume after a real Ctrl-C.

Everything runs the real pipeline on the tiny Kolors at 64 px on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import kstory.story as story
from kstory.cli import main
from kstory.story.spec_copy import disagreements

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_spec(path: Path, *, steps: int = 2, batch_size: int = 4, seeds: int = 1000, prompt5: str = "runs") -> Path:
    prompts = ["wakes up", "walks", "waves", "points", prompt5, "sits", "thinks", "comes home"]
    spec = {
        "title": "state test", "frame_count": 8,
        "character": {"trigger_word": "kstory style", "description": "a fox"},
        "defaults": {"width": 64, "height": 64, "steps": steps, "cfg_scale": 5.0},
        "generation": {"batch_size": batch_size},
        "frames": [{"prompt": p, "seed": seeds + i} for i, p in enumerate(prompts, start=1)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def frame_hashes(story_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((story_dir / "frames").glob("*.png"))}


def manifest(story_dir: Path) -> dict:
    return json.loads((story_dir / "manifest.json").read_text(encoding="utf-8"))


def history(run: Path) -> list[str]:
    return sorted(p.name for p in (run / ".history").iterdir()) if (run / ".history").exists() else []


@pytest.fixture()
def run(tmp_path: Path) -> Path:
    """A run folder with a spec beside the story, as the README lays it out, and a generated story."""
    spec = write_spec(tmp_path / "mine" / "story.yaml")
    story.generate_story(spec, tmp_path / "mine" / "story", model="tiny")
    return tmp_path / "mine"


def test_same_story_again_is_a_no_op(run: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kstory")
    before = frame_hashes(run / "story")
    result = story.generate_story(run / "story.yaml", run / "story", model="tiny")
    assert result.generated == [] and frame_hashes(run / "story") == before
    assert history(run) == [] and not (run / ".story.staging").exists()
    assert "story up to date" in caplog.text


def test_reroll_is_atomic_keeps_history_and_survives_a_spec_edit(run: Path) -> None:
    before = frame_hashes(run / "story")
    (run / "story" / "review.json").write_text('{"locked": ["1"], "order": []}')  # the dashboard's choices
    story.reroll(run / "story", 3, seed=4242)
    assert json.loads((run / "story" / "review.json").read_text())["locked"] == ["1"]
    after = frame_hashes(run / "story")
    assert [name for name in before if before[name] != after[name]] == ["03.png"]
    kept = history(run)
    assert len(kept) == 1 and frame_hashes(run / ".history" / kept[0]) == before  # the previous story, whole
    record = manifest(run / "story")["frames"]["3"]
    assert (record["seed"], record["spec_seed"], record["origin"]) == (4242, 1003, "reroll")
    copy = yaml.safe_load((run / "story" / "story.yaml").read_text())
    assert copy["frames"][2]["seed"] == 4242 and disagreements(run / "story" / "story.yaml", manifest(run / "story")) == []

    # The user edits frame 5 in their spec: only frame 5 is generated, the re-roll of frame 3 stands.
    write_spec(run / "story.yaml", prompt5="runs to the train")
    result = story.generate_story(run / "story.yaml", run / "story", model="tiny")
    assert result.generated == [5]
    final = frame_hashes(run / "story")
    assert {name for name in final if final[name] != after[name]} == {"05.png"}
    assert manifest(run / "story")["frames"]["3"]["seed"] == 4242

    # Editing the re-rolled frame's own spec entry makes the spec win again.
    spec = yaml.safe_load((run / "story.yaml").read_text())
    spec["frames"][2]["prompt"] = "waves goodbye"
    (run / "story.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    story.generate_story(run / "story.yaml", run / "story", model="tiny")
    record = manifest(run / "story")["frames"]["3"]
    assert (record["seed"], record["frame_prompt"], record["origin"]) == (1003, "waves goodbye", "spec")
    assert [entry["seed"] for entry in record["seed_history"]] == [1003, 4242, 1003]


def test_hand_edited_spec_copy_is_reported(run: Path) -> None:
    copy = run / "story" / "story.yaml"
    data = yaml.safe_load(copy.read_text())
    data["frames"][1]["seed"] = 7
    copy.write_text(yaml.safe_dump(data))
    assert disagreements(copy, manifest(run / "story")) == ["frame 2: seed 7 in story.yaml, 1002 in manifest.json"]


def test_partial_run_replaces_only_its_frames_atomically(run: Path) -> None:
    before = frame_hashes(run / "story")
    spec = write_spec(run / "story.yaml", seeds=2000)
    result = story.generate_story(spec, run / "story", model="tiny", frames=[2])
    after = frame_hashes(run / "story")
    assert result.generated == [2] and [n for n in before if before[n] != after[n]] == ["02.png"]
    assert manifest(run / "story")["frames"]["2"]["seed"] == 2002
    assert manifest(run / "story")["frames"]["1"]["seed"] == 1001  # untouched
    assert len(history(run)) == 1


def _story_cli(spec: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "kstory.cli", "story", str(spec), "--out", str(out), "--model", "tiny"]


@pytest.mark.slow
def test_ctrl_c_keeps_the_previous_story_and_the_next_run_resumes(tmp_path: Path) -> None:
    run = tmp_path / "mine"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    previous = write_spec(run / "story.yaml", steps=8, batch_size=1, seeds=1000)
    subprocess.run(_story_cli(previous, run / "story"), check=True, env=env, capture_output=True)
    old = frame_hashes(run / "story")
    old_manifest = (run / "story" / "manifest.json").read_bytes()

    spec = write_spec(run / "story.yaml", steps=8, batch_size=1, seeds=5000)  # every frame must be made again
    # A shell that starts this suite in the background leaves SIGINT ignored in its children; a user's Ctrl-C is not.
    process = subprocess.Popen(_story_cli(spec, run / "story"), env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    staged = run / ".story.staging" / "manifest.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if staged.is_file() and len(json.loads(staged.read_text() or "{}").get("frames", {})) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the story finished before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in err
    assert frame_hashes(run / "story") == old and (run / "story" / "manifest.json").read_bytes() == old_manifest
    finished = json.loads(staged.read_text())["frames"]
    assert 2 <= len(finished) < 8

    resumed = subprocess.run(_story_cli(spec, run / "story"), env=env, capture_output=True, text=True, check=True)
    assert "interrupted story run" in resumed.stderr
    assert f"{len(finished)} frame(s) unchanged and kept" in resumed.stderr
    assert not (run / ".story.staging").exists()
    straight = subprocess.run(_story_cli(spec, tmp_path / "straight" / "story"), env=env, capture_output=True,
                              check=True)
    assert straight.returncode == 0
    assert frame_hashes(run / "story") == frame_hashes(tmp_path / "straight" / "story")
    assert any(frame_hashes(run / ".history" / name) == old for name in history(run))


@pytest.mark.slow
def test_reroll_then_score_package_verify_is_identical(tmp_path: Path) -> None:
    from test_submissions_package import SUFFIX, TEAM, make_quick_run

    run = make_quick_run(tmp_path / "run")
    assert main(["reroll", str(run / "story"), "3", "--seed", "4242"]) == 0
    assert main(["score", str(run), "--aesthetic-model", "tiny"]) in (0, 3)
    assert main(["package", str(run), "--team", TEAM, "--suffix", SUFFIX, "--allow-failed-gate",
                 "--allow-test-model"]) == 0
    from kstory.submissions import verify_package

    report = verify_package(run / "submission", model="tiny")
    assert report.verdict == "identical", report.render()
    assert manifest(run / "submission")["frames"]["3"]["seed"] == 4242
