"""The shared core: config schema, YAML errors, atomic writes, run directory, CLI errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kstory.core import atomic
from kstory.cli import main
from kstory.core.config import load_config
from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir, fingerprint, move_to_history, read_stamp, write_stamp


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_config_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "cfg" / "run.yaml", "name: r1\nprep:\n  source: data/in\n  recipe: my.yaml\n"))
    assert config.run_dir == tmp_path / "cfg" / "runs" / "r1"
    assert Path(config.prep.source) == tmp_path / "cfg" / "data" / "in"
    assert config.prep.recipe == tmp_path / "cfg" / "my.yaml"
    assert config.model == "tiny"


def test_modelscope_sources_are_not_treated_as_paths(tmp_path: Path) -> None:
    config = load_config(write(tmp_path / "run.yaml", "name: r\nprep:\n  source: modelscope://AI-ModelScope/lowres_anime\n"))
    assert config.prep.source == "modelscope://AI-ModelScope/lowres_anime"


def test_config_errors_name_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "name: ok\nprep:\n  source: x\n  num_proc: zero\n  colour: red\n")
    with pytest.raises(KstoryError) as caught:
        load_config(path)
    text = caught.value.render()
    assert str(path) in text
    assert "line 4: prep.num_proc" in text
    assert "line 5: prep.colour" in text
    assert "fix:" in text


def test_config_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path / "run.yaml", "name: ok\nprep:\n  source: [unclosed\n")
    with pytest.raises(KstoryError, match="invalid YAML: line"):
        load_config(path)


def test_run_names_cannot_escape_the_runs_root(tmp_path: Path) -> None:
    with pytest.raises(KstoryError, match="line 1: name"):
        load_config(write(tmp_path / "run.yaml", "name: ../../etc\nprep:\n  source: x\n"))


def test_atomic_write_leaves_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = atomic.write_text(tmp_path / "out.json", "old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_directory_refuses_existing_and_cleans_staging(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        with atomic.atomic_directory(tmp_path):
            pass
    with pytest.raises(ValueError):
        with atomic.atomic_directory(tmp_path / "new") as staging:
            (staging / "a.txt").write_text("x")
            raise ValueError
    assert list(tmp_path.iterdir()) == []
    with atomic.atomic_directory(tmp_path / "new") as staging:
        (staging / "a.txt").write_text("x")
    assert (tmp_path / "new" / "a.txt").read_text() == "x"


def test_stamps_and_history_never_lose_outputs(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run").ensure()
    run.data.mkdir()
    (run.data / "keep.txt").write_text("precious")
    assert read_stamp(run.data) is None
    write_stamp(run.data, "prep", fingerprint("a"))
    assert read_stamp(run.data)["fingerprint"] == fingerprint("a")
    moved = move_to_history(run, run.data)
    assert not run.data.exists()
    assert (moved / "keep.txt").read_text() == "precious"
    write_stamp(run.scores, "score", "x")
    run.scores.write_text("{}")
    moved_file = move_to_history(run, run.scores)
    assert moved_file.read_text() == "{}"
    assert json.loads(moved_file.with_name(moved_file.name + ".stamp.json").read_text())["stage"] == "score"


def test_fingerprint_is_order_independent_for_keys() -> None:
    assert fingerprint({"a": 1, "b": 2}) == fingerprint({"b": 2, "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_cli_prints_user_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["run", str(tmp_path / "missing.yaml")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ")
    assert "missing.yaml" in err and "Traceback" not in err


def test_cli_help_explains_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kstory.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "run", "prep", "train", "story", "reroll", "score", "package", "verify", "upload", "app", "model", "status", "doctor"):
        assert f"    {command}" in out
    assert "runs/<name>/" in out


def test_torchvision_imports_and_nms_is_correct() -> None:
    import torch
    import torchvision  # noqa: F401  (would raise "operator torchvision::nms does not exist" without the fix)

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30], [0, 0, 9, 9.5]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.95])
    keep = torch.ops.torchvision.nms(boxes, scores, 0.5)
    assert keep.tolist() == [3, 2]


def test_atomic_files_get_ordinary_permissions(tmp_path: Path) -> None:
    import os

    mask = os.umask(0o022)
    try:
        target = atomic.write_text(tmp_path / "shared.txt", "x")
    finally:
        os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o644


def test_unknown_tiny_controlnet_name_is_a_clear_error() -> None:
    from kstory.cli.stages import controlnet_paths

    with pytest.raises(KstoryError, match="no tiny ControlNet named openpose") as caught:
        controlnet_paths({"openpose": "tiny"}, None)
    assert "pose" in caught.value.fix


def _readme_run(root: Path) -> Path:
    """runs/mine/kstory.yaml with story.yaml (and its canny picture) and a small source folder beside it."""
    from kstory.story import make_demo_spec

    run = root / "runs" / "mine"
    make_demo_spec(run / "story.yaml", "kstyle")
    write(run / "pictures" / "a.txt", "a caption")
    (run / "pictures" / "a.png").write_bytes(b"\x89PNG not really")
    return write(run / "kstory.yaml", "name: mine\nprep:\n  source: pictures\nstory:\n  spec: story.yaml\n")


def _digests(config_path: Path) -> dict[str, str]:
    from kstory.cli.stages import STAGES, run_digest

    config = load_config(config_path)
    run = RunDir(config.run_dir)
    return {"run": run_digest(config), **{stage.name: stage.digest(config, run) for stage in STAGES[:3]}}


def test_a_config_in_its_runs_folder_runs_there(tmp_path: Path) -> None:
    config = load_config(_readme_run(tmp_path))
    assert config.run_dir == tmp_path / "runs" / "mine"


def test_fingerprints_hash_content_not_places_or_times(tmp_path: Path) -> None:
    import os
    import shutil

    config = _readme_run(tmp_path / "here")
    before = _digests(config)
    write(config.parent / "kstory.log", "a log beside the spec\n")
    (config.parent / "data").mkdir()
    assert _digests(config) == before  # the run's own files never make its inputs stale

    copy = Path(shutil.copytree(config.parent, tmp_path / "there" / "runs" / "mine"))
    for path in copy.rglob("*"):
        os.utime(path, (1_000_000, 1_000_000))
    assert _digests(copy / "kstory.yaml") == before

    (copy / "story-reference.png").write_bytes(b"another picture")  # referenced by the spec's canny guide
    changed = _digests(copy / "kstory.yaml")
    assert changed["story"] != before["story"] and changed["prep"] == before["prep"]
    (copy / "pictures" / "a.png").write_bytes(b"\x89PNG other")
    assert _digests(copy / "kstory.yaml")["prep"] != before["prep"]


def test_train_fingerprint_leaves_out_the_schedule(tmp_path: Path) -> None:
    config = _readme_run(tmp_path)
    before = _digests(config)["train"]
    text = config.read_text(encoding="utf-8")
    write(config, text + "train:\n  max_steps: 900\n  checkpoint_every: 7\n")
    assert _digests(config)["train"] == before
    write(config, text + "train:\n  rank: 8\n")
    assert _digests(config)["train"] != before
