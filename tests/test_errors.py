"""The error contract: one message naming the file and the fix, exit 2, no traceback unless --debug."""

from __future__ import annotations

import errno
import logging
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from kstory.core import atomic
from kstory.cli import EXIT_USER_ERROR, build_parser, main, parse_frames
from kstory.core.config import load_config
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger, log_to_file, setup_console
from kstory.core.oserrors import os_fault
from kstory.core.seeds import SEED_LIMIT
from kstory.story.spec import load_spec
from tests.faultfs import fill, set_read_only, small_tmpfs
from kstory.train import TrainSettings

LONG_NAME = "x" * 300  # over every Linux file system's 255-byte name limit


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def config(tmp_path: Path, extra: str = "") -> Path:
    return write(tmp_path / "kstory.yaml", f"name: mine\nprep:\n  source: data\n{extra}")


# --- OS faults -------------------------------------------------------------------------------------------------


def test_a_real_safetensors_error_maps_without_any_mount(tmp_path: Path) -> None:
    """safetensors raises its own type with the io error's text; the mapper reads the errno from it."""
    with pytest.raises(SafetensorError) as raised:
        save_file({"a": torch.zeros(2)}, str(tmp_path / f"{LONG_NAME}.safetensors"))
    fault = os_fault(raised.value, tmp_path / "lora.safetensors")
    assert fault is not None and "path too long" in fault.message and "shorter" in fault.fix
    assert fault.path == tmp_path / "lora.safetensors"

    write(tmp_path / "file", "a file, not a folder")
    with pytest.raises(SafetensorError) as raised:
        save_file({"a": torch.zeros(2)}, str(tmp_path / "file" / "x.safetensors"))
    fault = os_fault(raised.value)
    assert fault is not None and "is a file, not a folder" in fault.message and fault.path == tmp_path / "file"


def test_errors_that_are_not_the_users_to_fix_are_left_alone() -> None:
    assert os_fault(OSError(errno.EIO, "Input/output error")) is None
    assert os_fault(SafetensorError("Error while deserializing header: HeaderTooLarge")) is None
    assert os_fault(ValueError("no")) is None


def test_atomic_write_names_the_target_not_its_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / LONG_NAME
    with pytest.raises(KstoryError, match="path too long") as raised:
        atomic.write_text(target, "x")
    assert raised.value.path == target


def test_atomic_writes_on_a_real_read_only_and_full_disk_keep_the_old_file(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "disk", size="1m") as disk:
        atomic.write_text(disk / "old.txt", "old")
        set_read_only(disk)
        with pytest.raises(KstoryError, match="read-only file system"):
            atomic.write_text(disk / "old.txt", "new")
        set_read_only(disk, False)
        filler = fill(disk)
        with pytest.raises(KstoryError, match="disk full") as raised:
            atomic.write_bytes(disk / "old.txt", b"n" * 100_000)
        assert raised.value.path == disk / "old.txt" and "free space" in raised.value.fix
        filler.unlink()
        assert (disk / "old.txt").read_text() == "old" and [p.name for p in disk.iterdir()] == ["old.txt"]


def test_cli_maps_an_os_fault_that_reaches_it_to_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A raw OSError from a plain mkdir (no atomic writer around it) still reads as a user error."""
    code = main(["run", str(config(tmp_path, f"runs_root: {LONG_NAME}\n"))])
    err = capsys.readouterr().err
    assert code == EXIT_USER_ERROR, err
    assert "path too long" in err and "unexpected" not in err and "Traceback" not in err


# --- the terminal ---------------------------------------------------------------------------------------------


def test_console_shows_no_traceback_but_the_log_file_keeps_it(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    setup_console()
    log = get_logger("test")
    with log_to_file(tmp_path / "kstory.log"):
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            log.error("stage stopped", exc_info=True)
    err = capsys.readouterr().err
    assert "stage stopped" in err and "Traceback" not in err
    assert "Traceback" in (tmp_path / "kstory.log").read_text() and "RuntimeError: boom" in (tmp_path / "kstory.log").read_text()
    setup_console(debug=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.error("stage stopped", exc_info=True)
    assert "Traceback" in capsys.readouterr().err
    setup_console()
    logging.getLogger().handlers[:] = [h for h in logging.getLogger().handlers if not getattr(h, "_kstory_console", False)]


@pytest.mark.parametrize("argv", [
    ["--debug", "-v", "doctor"], ["doctor", "--debug", "-v"], ["--debug", "doctor", "-v"], ["-v", "doctor", "--debug"],
])
def test_debug_and_verbose_work_before_or_after_the_command(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.debug is True and args.verbose is True


def test_flags_given_nowhere_stay_off() -> None:
    args = build_parser().parse_args(["doctor"])
    assert args.debug is False and args.verbose is False
    args = build_parser().parse_args(["doctor", "-v"])
    assert args.debug is False and args.verbose is True


def test_frame_selection_takes_lists_and_ranges(capsys: pytest.CaptureFixture) -> None:
    assert parse_frames("1,3") == [1, 3]
    assert parse_frames("2-4, 7,3") == [2, 3, 4, 7]
    for bad in ("a,b", "0", "3-1", "1-", "-2", "1,,2"):
        with pytest.raises(KstoryError, match="not a frame number"):
            parse_frames(bad)
    assert main(["story", "spec.yaml", "--out", "out", "--frames", "a,b"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err.startswith("error: --frames 'a,b'") and "unexpected" not in err


def test_documented_exit_statuses_match_the_code() -> None:
    import kstory.scoring as scoring
    from kstory import cli

    assert (cli.EXIT_USER_ERROR, cli.EXIT_GATE_FAILED, cli.EXIT_NOT_REPRODUCED) == (2, scoring.GATE_FAILED_EXIT, 4)
    table = (Path(__file__).parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    for status in (cli.EXIT_OK, cli.EXIT_BUG, cli.EXIT_USER_ERROR, cli.EXIT_GATE_FAILED, cli.EXIT_NOT_REPRODUCED,
                   cli.EXIT_INTERRUPTED):
        assert f"\n| {status} | " in table


def test_reroll_seed_out_of_range_is_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["reroll", "story", "3", "--seed", "-5"])
    assert exited.value.code == EXIT_USER_ERROR
    assert "out of range" in capsys.readouterr().err
    from kstory.story import reroll

    for seed in (-1, SEED_LIMIT):  # the Python API (and the dashboard through it) checks too
        with pytest.raises(KstoryError, match=f"seed {seed} is out of range"):
            reroll(Path("story"), 3, seed=seed)


# --- validation -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-5, SEED_LIMIT])
def test_run_seed_out_of_range_names_the_line(tmp_path: Path, seed: int) -> None:
    with pytest.raises(KstoryError, match=r"line 4: seed") as raised:
        load_config(config(tmp_path, f"seed: {seed}\n"))
    assert "docs/config.md" in raised.value.fix


@pytest.mark.parametrize("section", ["train:\n  seed: -1\n", "train:\n  validation_prompts:\n  - {prompt: a, seed: -1}\n"])
def test_train_seeds_are_checked_and_point_at_the_train_page(tmp_path: Path, section: str) -> None:
    with pytest.raises(KstoryError, match=r"line \d+: train\..*seed") as raised:
        load_config(config(tmp_path, section))
    assert "docs/train.md" in raised.value.fix


def test_train_settings_are_validated_and_take_the_run_seed(tmp_path: Path) -> None:
    loaded = load_config(config(tmp_path, f"seed: {SEED_LIMIT - 1}\ntrain:\n  rank: 2\n"))
    settings = loaded.train_settings()
    assert settings.seed == SEED_LIMIT - 1 and settings.rank == 2
    assert load_config(config(tmp_path, "seed: 3\ntrain:\n  seed: 9\n")).train_settings().seed == 9
    broken = loaded.model_copy(update={"seed": -5})  # what a copy could smuggle past validation
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        broken.train_settings()
    with pytest.raises(ValueError, match="less than"):
        TrainSettings(seed=SEED_LIMIT)


def test_bad_train_option_on_the_command_line_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(tmp_path), "--out", str(tmp_path / "out"), "--steps", "0"]) == EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert "--steps: Input should be greater than or equal to 1" in err and "docs/train.md" in err


def test_story_seed_out_of_range_points_at_the_story_page(tmp_path: Path) -> None:
    frames = "".join(f"  - {{prompt: frame {i}, seed: {SEED_LIMIT if i == 2 else i}}}\n" for i in range(1, 3))
    spec = write(tmp_path / "story.yaml", f"title: t\nframe_count: 2\nframes:\n{frames}")
    with pytest.raises(KstoryError, match=r"line 5: frames\.1\.seed") as raised:
        load_spec(spec)
    assert "docs/story.md" in raised.value.fix


def test_duplicate_keys_are_refused_with_both_lines(tmp_path: Path) -> None:
    with pytest.raises(KstoryError, match=r"name is given twice, on line 1 and line 4") as raised:
        load_config(config(tmp_path, "name: other\n"))
    assert raised.value.path == tmp_path / "kstory.yaml"
    spec = write(tmp_path / "story.yaml", "title: t\nframe_count: 1\nframes:\n  - prompt: a\n    seed: 1\n    seed: 2\n")
    with pytest.raises(KstoryError, match=r"frames\.0\.seed is given twice, on line 5 and line 6") as raised:
        load_spec(spec)
    assert raised.value.path == spec


def test_a_missing_story_spec_points_at_the_story_page(tmp_path: Path) -> None:
    with pytest.raises(KstoryError, match="file not found") as raised:
        load_spec(tmp_path / "nope.yaml")
    assert "docs/story.md" in raised.value.fix
