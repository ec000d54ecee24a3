"""Background jobs, the run lock and `kstory status`, with real processes on the shared demo run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kstory.cli import jobs
from kstory.cli import main as cli_main
from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.runlock import LOCK_NAME, process_start_time, read_lock, run_folder_for, run_lock

JOB_TIMEOUT = 300


def _folder_hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _write_lock(run: Path, pid: int, started: int | None, command: str = "kstory story x") -> None:
    import socket

    (run / LOCK_NAME).write_text(json.dumps({"pid": pid, "started": started, "host": socket.gethostname(),
                                             "command": command, "since": "earlier"}), encoding="utf-8")


# --- the lock -----------------------------------------------------------------------------------------------

def test_run_folder_of_an_output(tmp_path: Path) -> None:
    assert run_folder_for(tmp_path / "r" / "story") == tmp_path / "r"
    assert run_folder_for(tmp_path / "r" / "scores.json") == tmp_path / "r"
    assert run_folder_for(tmp_path / "elsewhere.json") is None
    (tmp_path / "kstory.yaml").write_text("name: x\n")
    assert run_folder_for(tmp_path / "my-scores.json") == tmp_path


def test_stale_locks_are_recovered_and_live_ones_refuse(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_lock(tmp_path, gone.pid, 12345)  # that process has ended
    with caplog.at_level(logging.WARNING, logger="kstory"), run_lock(tmp_path, "kstory test"):
        assert read_lock(tmp_path)["pid"] == os.getpid()
        (tmp_path / "alias").symlink_to(tmp_path)
        with run_lock(tmp_path / "alias", "kstory nested"):  # the same process may take it again, however spelled
            pass
        assert (tmp_path / LOCK_NAME).is_file()
    assert not (tmp_path / LOCK_NAME).exists()
    assert "recovered a stale lock" in caplog.text and f"pid {gone.pid}" in caplog.text

    _write_lock(tmp_path, os.getppid(), -1)  # a live pid, but another start time: the pid was reused
    with run_lock(tmp_path, "kstory test"):
        pass

    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, holder.pid, process_start_time(holder.pid), "kstory reroll runs/x/story 3")
        with pytest.raises(KstoryError, match=r"busy: `kstory reroll runs/x/story 3` \(pid"):
            with run_lock(tmp_path, "kstory test"):
                pass
        assert read_lock(tmp_path)["pid"] == holder.pid  # a live holder's lock is never removed
    finally:
        holder.kill()
        holder.wait()


# --- jobs on the demo run -----------------------------------------------------------------------------------

def test_a_job_runs_to_completion_in_its_own_process(demo_runs: Path) -> None:
    run = demo_runs / "demo"
    job_id = jobs.start(run, [{"argv": ["run", str(run / "kstory.yaml")]}], label="Run every stage")
    record = jobs.wait(run, job_id, JOB_TIMEOUT)
    assert record["state"] == "done", (record, jobs.log_tail(run, job_id))
    assert record["exit_status"] == 0 and record["pid"] != os.getpid() and record["finished_at"]
    assert record["progress"]["fraction"] == 1.0 and record["progress"]["step"] == record["progress"]["steps"] == 1
    assert "score: up to date" in jobs.log_tail(run, job_id, lines=100)
    assert read_lock(run) is None  # released when the job ended
    status = subprocess.run([sys.executable, "-m", "kstory.cli", "status", str(run)], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert status.returncode == 0, status.stderr
    assert "writer: none" in status.stdout and f"{job_id}  done" in status.stdout
    for stage in ("prep", "train", "story", "score"):
        assert f"  {stage:<6} up to date" in status.stdout, status.stdout


def test_cancel_keeps_the_story_and_a_second_writer_is_refused(demo_runs: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import yaml

    run = demo_runs / "demo"
    inputs = shutil.copytree(run / "inputs", tmp_path / "inputs", ignore=shutil.ignore_patterns("style-dataset"))
    spec = yaml.safe_load((inputs / "story.yaml").read_text(encoding="utf-8"))
    spec["defaults"].update(steps=200, width=256, height=256)  # slow enough to be cancelled half-way
    (inputs / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    before = _folder_hashes(run / "story")
    argv = ["story", str(inputs / "story.yaml"), "--out", str(run / "story"), "--model", "tiny",
            "--lora", str(run / "lora" / "lora.safetensors"), "--controlnet", "pose=tiny", "--controlnet", "union=tiny"]
    job_id = jobs.start(run, [{"argv": argv}], label="Story with 200 steps")
    try:
        jobs.wait(run, job_id, JOB_TIMEOUT, until=frozenset({"running", *jobs.FINAL}))
        deadline = time.monotonic() + JOB_TIMEOUT
        while not (run / ".story.staging").is_dir() and time.monotonic() < deadline:
            assert jobs.load(run, job_id)["state"] == "running", jobs.log_tail(run, job_id)
            time.sleep(0.2)

        with pytest.raises(KstoryError, match=f"busy: job {job_id}|busy: `job {job_id}"):
            jobs.start(run, [{"argv": ["run", str(run / "kstory.yaml")]}], label="second")
        capsys.readouterr()
        assert cli_main(["score", str(run / "story" / "frames"), "--out", str(run / "scores.json")]) == 2
        assert f"job {job_id}: kstory story" in capsys.readouterr().err  # the refusal names the running job
        from kstory.cli.status import render_status

        text = render_status(run)
        assert f"{job_id}  running" in text and "writer: `job " in text
        # Cancelled from the dashboard, as a user would: the Story page lists the running job with its button.
        from streamlit.testing.v1 import AppTest

        from kstory.cli.launch import MAIN, RUN_ENV, RUNS_ROOT_ENV

        monkeypatch.setenv(RUNS_ROOT_ENV, str(demo_runs))
        monkeypatch.setenv(RUN_ENV, "demo")
        at = AppTest.from_file(str(MAIN), default_timeout=JOB_TIMEOUT).run()
        at.sidebar.radio(key="page").set_value("Story").run()
        at.button(key=f"cancel_{job_id}").click().run()
        assert not at.exception, [e.value for e in at.exception]
        record = jobs.wait(run, job_id, JOB_TIMEOUT)
    finally:
        if jobs.load(run, job_id)["state"] not in jobs.FINAL:
            jobs.cancel(run, job_id, wait_s=JOB_TIMEOUT)
        record = jobs.load(run, job_id)
    assert record["state"] == "cancelled", (record, jobs.log_tail(run, job_id))
    assert record["exit_status"] == 130
    assert _folder_hashes(run / "story") == before  # nothing of the cancelled story got into the run
    assert read_lock(run) is None
    # The interrupted build waits in .story.staging for the next story change to reuse its frames; this test's
    # 200-step spec is not the demo's, so put it away for the other tests sharing the demo run.
    shutil.move(str(run / ".story.staging"), str(tmp_path / "interrupted-staging"))
