"""Every command that writes, on a read-only run folder and on a full disk: one clear message, exit 2, nothing lost.

The faults are real (a small tmpfs, remounted read-only or filled up); the run
is the shared tiny demo run, copied onto the tmpfs for each test.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from kstory.cli import EXIT_USER_ERROR, main
from tests.faultfs import fill, set_read_only, small_tmpfs

# command line with {run} for the run folder; each writes somewhere inside it
COMMANDS = {
    "prep": "prep {run}/inputs/style-dataset --out {run}/data-again",
    "train": "train {run}/data --out {run}/lora-again --steps 1 --resolution 64",
    "story": "story {run}/inputs/story.yaml --out {run}/story-again --frames 1-2 --controlnet pose=tiny --controlnet union=tiny",
    "reroll": "reroll {run}/story 3 --seed 7",
    "score": "score {run}/story/frames --out {run}/scores.json",
    "package": "package {run} --team team --suffix faults --allow-failed-gate",
    "run": "run {run}/kstory.yaml",
    "demo": "demo --out {run}/demo-again --images 4",
}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _lost(before: dict[str, str], root: Path) -> list[str]:
    """Files of ``before`` whose content is neither at its place nor kept in .history/ (a log may only grow)."""
    after = _hashes(root)
    kept = {digest for name, digest in after.items() if name.startswith(".history/")}
    return [name for name, digest in before.items()
            if after.get(name) != digest and digest not in kept and not _grew_from(root / name, digest)]


def _grew_from(path: Path, digest: str) -> bool:
    """True for a log whose old content is still there, with new lines appended."""
    if path.suffix != ".log" or not path.is_file():
        return False
    data = path.read_bytes()
    return any(hashlib.sha256(data[:end]).hexdigest() == digest for end in range(len(data), -1, -1)
               if end == len(data) or data[end - 1:end] == b"\n")


def _run(command: str, run: Path, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    capsys.readouterr()
    code = main(command.format(run=run).split())
    return code, capsys.readouterr().err


def _assert_one_clear_message(code: int, err: str, what: str) -> None:
    assert code == EXIT_USER_ERROR, err
    assert "Traceback" not in err and "unexpected" not in err and "please report" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert what in errors[0], err
    assert "\nfix: " in err, err


@pytest.fixture
def run_on_tmpfs(demo_runs: Path, tmp_path: Path):
    with small_tmpfs(tmp_path / "disk", size="16m") as disk:
        run = disk / "demo"
        shutil.copytree(demo_runs / "demo", run, symlinks=True)
        yield run


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_read_only_run_folder(name: str, run_on_tmpfs: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_on_tmpfs
    before = _hashes(run)
    set_read_only(run.parent)
    code, err = _run(COMMANDS[name], run, capsys)
    _assert_one_clear_message(code, err, "read-only file system")
    assert f"{run}" in err
    set_read_only(run.parent, False)
    assert _lost(before, run) == []


@pytest.mark.slow
@pytest.mark.parametrize("name", list(COMMANDS))
def test_full_disk(name: str, run_on_tmpfs: Path, capsys: pytest.CaptureFixture) -> None:
    run = run_on_tmpfs
    if name == "run":  # an up-to-date run writes nothing: make the score stage due again
        (run / "scores.json").unlink()
    before = _hashes(run)
    filler = fill(run.parent)
    code, err = _run(COMMANDS[name], run, capsys)
    _assert_one_clear_message(code, err, "disk full")
    filler.unlink()
    assert _lost(before, run) == []
