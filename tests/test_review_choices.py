"""The dashboard's review choices take effect: the picked checkpoint is the story's LoRA, the package follows the
chosen order and keeps locked frames, and verify reproduces the reordered package."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kstory.cli import main
from kstory.cli.runner import run_config
from kstory.core.errors import KstoryError
from kstory.story import review
from kstory.submissions import build_package, verify_package
from kstory.submissions.package import PACKAGE_FILE

STAGES = ["prep", "train", "story", "score"]
ORDER = ["3", "1", "2", "8", "4", "5", "6", "7"]  # package frame N is the story's frame ORDER[N-1]
LOCKED = {"3", "6"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _statuses(outcomes) -> dict[str, str]:
    """What each configured stage did (package and upload are not configured in these runs)."""
    return {outcome.stage: outcome.status for outcome in outcomes if outcome.status != "not configured"}


def _manifest(run: Path) -> dict:
    return json.loads((run / "story" / "manifest.json").read_text(encoding="utf-8"))


def _first_checkpoint(run: Path) -> str:
    return sorted(p.name for p in (run / "lora" / "checkpoints").iterdir())[0]


@pytest.fixture(scope="module")
def picked(demo_runs: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, list]:
    """A copy of the demo run with an early checkpoint picked, an order and locks chosen, run again."""
    run = tmp_path_factory.mktemp("picked") / "demo"
    shutil.copytree(demo_runs / "demo", run)
    step = _first_checkpoint(run)
    assert _manifest(run)["lora"]["checkpoint"] is None  # the demo's story uses the final LoRA
    review.save(run / "story", review.Review(locked=set(LOCKED), order=list(ORDER), checkpoint=step))
    outcomes = run_config(run / "kstory.yaml")
    return run, step, outcomes


def test_picked_checkpoint_is_the_story_lora(picked: tuple[Path, str, list]) -> None:
    run, step, outcomes = picked
    assert _statuses(outcomes) == {"prep": "skipped", "train": "skipped", "story": "ran", "score": "ran"}
    lora = _manifest(run)["lora"]
    chosen = run / "lora" / "checkpoints" / step / "lora.safetensors"
    assert lora["checkpoint"] == step and lora["sha256"] == _sha(chosen) != _sha(run / "lora" / "lora.safetensors")
    assert Path(lora["path"]) == chosen.resolve()
    # the review choices survive the new story folder, and a second run has nothing to do
    assert review.load(run / "story").checkpoint == step and review.load(run / "story").order == ORDER
    assert _statuses(run_config(run / "kstory.yaml")) == dict.fromkeys(STAGES, "skipped")


@pytest.fixture(scope="module")
def package(picked: tuple[Path, str, list]) -> Path:
    run = picked[0]
    return build_package(run, team="team", suffix="order", allow_failed_gate=True, allow_test_model=True)


def test_package_ships_the_picked_lora_in_the_chosen_order(picked: tuple[Path, str, list], package: Path) -> None:
    run, step, _ = picked
    index = json.loads((package / PACKAGE_FILE).read_text(encoding="utf-8"))
    assert _sha(package / "lora.safetensors") == _sha(run / "lora" / "checkpoints" / step / "lora.safetensors")
    assert index["lora_checkpoint"] == step
    assert index["story_frames"] == {str(n): int(key) for n, key in enumerate(ORDER, start=1)}
    assert sorted(index["locked_frames"], key=int) == sorted(str(ORDER.index(k) + 1) for k in LOCKED)
    story = _manifest(run)
    shipped = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    for n, key in enumerate(ORDER, start=1):
        frame = shipped["frames"][str(n)]
        assert frame["file"] == f"frames/{n:02d}.png" and frame["story_frame"] == int(key)
        assert frame["seed"] == story["frames"][key]["seed"] and frame["prompt"] == story["frames"][key]["prompt"]
        # every frame, locked ones included, is the story's picture byte for byte
        assert _sha(package / frame["file"]) == frame["sha256"] == _sha(run / "story" / story["frames"][key]["file"])
        for guide in frame["guides"]:
            assert guide["file"].startswith(f"guides/{n:02d}-") and (package / guide["file"]).is_file()
    scores = json.loads((package / "scores.json").read_text(encoding="utf-8"))
    assert [Path(i["file"]).name for i in scores["images"]] == [f"{n:02d}.png" for n in range(1, 9)]
    assert [i["sha256"] for i in scores["images"]] == [shipped["frames"][str(n)]["sha256"] for n in range(1, 9)]
    card = (package / "README.md").read_text(encoding="utf-8")
    rows = [line for line in card.splitlines() if line.startswith("| ") and "![" in line]
    assert [row.split("](")[1].split(")")[0] for row in rows] == [f"frames/{n:02d}.png" for n in range(1, 9)]
    assert all(f"| {story['frames'][key]['seed']} |" in row for key, row in zip(ORDER, rows))


def test_reordered_package_verifies_identical(package: Path) -> None:
    report = verify_package(package)
    assert report.verdict == "identical", report.render()
    assert [f.file for f in report.frames] == [f"frames/{n:02d}.png" for n in range(1, 9)]
    assert report.scores_match


def test_package_refuses_a_story_lora_the_run_no_longer_has(picked: tuple[Path, str, list], tmp_path: Path) -> None:
    run, step, _ = picked
    copy = tmp_path / "demo"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".history", "submission", "data"))
    shutil.rmtree(copy / "lora" / "checkpoints" / step)
    with pytest.raises(KstoryError, match=f"checkpoint {step}"):
        build_package(copy, team="team", suffix="order", allow_failed_gate=True, allow_test_model=True)


def test_deleted_pick_is_a_clear_error_until_the_user_takes_the_final_lora(demo_runs: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "demo"
    shutil.copytree(demo_runs / "demo", run)
    step = _first_checkpoint(run)
    review.save(run / "story", review.Review(checkpoint=step))
    shutil.rmtree(run / "lora" / "checkpoints" / step)
    with pytest.raises(KstoryError, match=f"picked checkpoint {step}") as raised:
        run_config(run / "kstory.yaml")
    assert "--use-final-lora" in raised.value.fix
    assert _manifest(run)["lora"]["checkpoint"] is None  # the story was left as it was
    assert main(["run", str(run / "kstory.yaml"), "--use-final-lora"]) == 0
    assert review.load(run / "story").checkpoint is None
    # back on the final LoRA the story made with it is up to date again: nothing regenerated
    assert _statuses(run_config(run / "kstory.yaml")) == dict.fromkeys(STAGES, "skipped")
    assert _manifest(run)["lora"]["sha256"] == _sha(run / "lora" / "lora.safetensors")


def test_checkpoint_names_stay_inside_the_lora_folder(tmp_path: Path) -> None:
    story = tmp_path / "story"
    story.mkdir()
    review.save(story, review.Review(checkpoint="../../elsewhere"))
    with pytest.raises(KstoryError, match="not a checkpoint name"):
        review.story_lora(tmp_path / "lora", story)
    assert review.drop_checkpoint(story) == "../../elsewhere" and review.load(story).checkpoint is None
    assert review.story_lora(tmp_path / "lora", story) == (None, None)  # no LoRA trained yet


def test_reroll_of_a_moved_run_finds_the_picked_checkpoint(picked: tuple[Path, str, list], tmp_path: Path) -> None:
    from kstory.story import reroll

    run, step, _ = picked
    copy = tmp_path / "moved"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".history", "submission", "data"))
    manifest = _manifest(copy)
    manifest["lora"]["path"] = str(tmp_path / "gone" / "lora.safetensors")  # where the run used to live
    (copy / "story" / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    seed = manifest["frames"]["5"]["seed"] + 1  # a seed frame 5 does not have yet (the demo run is shared)
    result = reroll(copy / "story", 5, seed=seed)  # 1 and 2 are identity frames
    assert result.generated == [5]
    after = _manifest(copy)
    assert after["lora"]["checkpoint"] == step and after["lora"]["sha256"] == manifest["lora"]["sha256"]
    assert after["frames"]["5"]["seed"] == seed and review.load(copy / "story").order == ORDER
