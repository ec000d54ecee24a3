"""Background jobs: a long command run in its own process, its state, progress and log kept in the run.

The dashboard starts re-rolls, packaging, uploads and re-scores as jobs, so a
reload or a closed tab loses nothing: the job outlives the page, and any page
(or ``kstory status``) reads what it is doing from ``RUN/.jobs/<id>/``:

* ``job.json``: label, steps, state (queued, running, done, failed, cancelled),
  pid and its start time, timestamps, exit status, error, progress, result;
* ``log.txt``: everything the job printed and logged.

A step is a ``kstory`` command line (``{"argv": [...]}``, run through
``kstory.cli.main``) or a Python function (``{"call": "module:function",
"kwargs": {...}}``). The job process holds the run's lock (kstory.runlock)
while it runs, so a second writer is refused. Secrets travel only in the
child's environment, never in the steps, ``job.json`` or the log.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from kstory.core import atomic
from kstory.core.errors import KstoryError
from kstory.core.runlock import describe, holder_alive, is_alive, process_start_time, read_lock, run_lock

JOBS_DIR = ".jobs"
FORMAT = "kstory-job/1"
FINAL = frozenset({"done", "failed", "cancelled"})
QUEUED_TIMEOUT_S = 120.0
SECRET_ENVS = ("MODELSCOPE_API_TOKEN",)
_children: list[subprocess.Popen] = []  # started here; polled so that finished ones do not linger as zombies


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def job_dir(run_root: Path, job_id: str) -> Path:
    return Path(run_root) / JOBS_DIR / job_id


def _save(run_root: Path, record: dict[str, Any]) -> None:
    atomic.write_json(job_dir(run_root, record["id"]) / "job.json", record)


def describe_step(step: dict[str, Any]) -> str:
    """A step in words: its command line, or its function and arguments."""
    if "argv" in step:
        return "kstory " + " ".join(str(part) for part in step["argv"])
    kwargs = ", ".join(f"{key}={value!r}" for key, value in (step.get("kwargs") or {}).items())
    return f"{step['call']}({kwargs})"


def _effective(record: dict[str, Any]) -> dict[str, Any]:
    """The record as it really is: a job whose process vanished without a word has failed."""
    state = record.get("state")
    if state == "running" and not is_alive(record.get("pid"), record.get("pid_started")):
        return {**record, "state": "failed", "error": "the job process ended without recording a result (killed?)"}
    if state == "queued" and time.time() - float(record.get("created", 0)) > QUEUED_TIMEOUT_S:
        return {**record, "state": "failed", "error": "the job process never started"}
    return record


def load(run_root: Path, job_id: str) -> dict[str, Any]:
    """One job's record (with a vanished process shown as failed)."""
    path = job_dir(run_root, job_id) / "job.json"
    try:
        return _effective(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as error:
        raise KstoryError(f"job {job_id} has no readable job.json ({error})", path=path,
                          fix="delete the job's folder; the run's own files are not affected") from error


def list_jobs(run_root: Path) -> list[dict[str, Any]]:
    """Every job of the run, newest first; unreadable job folders are skipped."""
    for child in list(_children):
        if child.poll() is not None:
            _children.remove(child)
    folder = Path(run_root) / JOBS_DIR
    jobs = []
    for item in sorted(folder.iterdir(), reverse=True) if folder.is_dir() else []:
        try:
            jobs.append(load(run_root, item.name))
        except KstoryError:
            continue
    return jobs


def active(run_root: Path) -> list[dict[str, Any]]:
    """Jobs of the run that are queued or running."""
    return [job for job in list_jobs(run_root) if job.get("state") not in FINAL]


def busy(run_root: Path) -> str | None:
    """Who is writing into the run now (a live lock holder or an active job), in words; None when no one."""
    lock = read_lock(Path(run_root))
    if lock is not None and holder_alive(lock):
        return describe(lock)
    for job in active(run_root):
        return f"job {job['id']} ({job.get('label', '')}: `{job.get('command', '')}`)"
    return None


def start(run_root: Path, steps: list[dict[str, Any]], *, label: str, env: dict[str, str] | None = None) -> str:
    """Start a job on the run in a process of its own and return its id.

    ``env`` adds variables (secrets such as the upload token) to the job's
    environment only. Refused when another command or job writes into the run.
    """
    run_root = Path(run_root).absolute()
    holder = busy(run_root)
    if holder:
        raise KstoryError(f"the run is busy: {holder} is writing into it", path=run_root,
                          fix="wait for it to finish or cancel it, then start this again")
    for step in steps:
        if ("argv" in step) == ("call" in step):
            raise ValueError(f"a job step is either argv or call: {step!r}")
    now = time.time()  # ids sort by creation time, to the millisecond
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    job_id = f"{stamp}.{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"
    folder = job_dir(run_root, job_id)
    folder.mkdir(parents=True)
    record = {
        "format": FORMAT, "id": job_id, "label": label, "steps": steps,
        "command": "; ".join(describe_step(step) for step in steps),
        "state": "queued", "created": time.time(), "created_at": _now(), "host": socket.gethostname(),
        "pid": None, "pid_started": None, "started_at": None, "finished_at": None,
        "exit_status": None, "error": None, "result": None,
        "progress": {"step": 0, "steps": len(steps), "done": 0, "total": 0, "fraction": 0.0, "text": "queued"},
    }
    _save(run_root, record)
    child_env = {**os.environ, **(env or {})}
    project = str(Path(__file__).resolve().parent.parent)  # the same code as this process, installed or not
    child_env["PYTHONPATH"] = os.pathsep.join(p for p in (project, child_env.get("PYTHONPATH", "")) if p)
    with open(folder / "log.txt", "ab") as log_file:
        _children.append(subprocess.Popen(
            [sys.executable, "-m", "kstory.cli.jobs", str(run_root), job_id], stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, env=child_env, start_new_session=True))
    return job_id


def wait(run_root: Path, job_id: str, timeout: float = 600.0, *, until: frozenset[str] = FINAL) -> dict[str, Any]:
    """Poll the job until its state is in ``until`` (default: finished); raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        list_jobs(run_root)  # reaps finished children
        record = load(run_root, job_id)
        if record.get("state") in until:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {record.get('state')} after {timeout:.0f} s")
        time.sleep(0.2)


def cancel(run_root: Path, job_id: str, wait_s: float = 60.0) -> dict[str, Any]:
    """Interrupt the job (SIGINT to its process group, like Ctrl-C) and wait up to ``wait_s`` for it to stop.

    The commands stop cleanly on Ctrl-C: the story keeps its previous
    version, training saves a checkpoint. Returns the record (still
    ``running`` if the job needs longer to stop).
    """
    deadline = time.monotonic() + wait_s
    signalled = False
    while True:
        list_jobs(run_root)
        record = load(run_root, job_id)
        if record.get("state") in FINAL:
            return record
        if record.get("state") == "running" and not signalled:
            try:
                os.killpg(int(record["pid"]), signal.SIGINT)
            except ProcessLookupError:
                pass
            signalled = True
        if time.monotonic() > deadline:
            return record
        time.sleep(0.2)


def log_tail(run_root: Path, job_id: str, lines: int = 20) -> str:
    """The last ``lines`` lines of the job's log (progress bars' carriage returns folded)."""
    path = job_dir(run_root, job_id) / "log.txt"
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, path.stat().st_size - 64_000))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    rows = [row.rsplit("\r", 1)[-1] for row in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([row for row in rows if row.strip()][-lines:])


# --- the job process ----------------------------------------------------------------------------------------

_PATTERNS = (  # (regex on a log message, how it moves the progress)
    (re.compile(r"step (\d+)/(\d+)"), "steps"),  # train
    (re.compile(r"(\d+) frame\(s\) unchanged and kept, (\d+) to generate"), "frames_total"),  # story
    (re.compile(r"frames? ([\d, ]+) done in"), "frames_done"),  # story, reroll
)


class _Progress(logging.Handler):
    """Turns the stages' log lines into the job's progress (steps, frames) and saves it now and then."""

    def __init__(self, run_root: Path, record: dict[str, Any]) -> None:
        super().__init__(logging.INFO)
        self.run_root, self.record, self.saved = run_root, record, 0.0
        self.guard = threading.Lock()

    def step(self, index: int, label: str) -> None:
        with self.guard:
            progress = self.record["progress"]
            progress.update(step=index + 1, done=0, total=0, text=label)
            self._fraction()
            self._save(force=True)

    def _fraction(self) -> None:
        progress = self.record["progress"]
        inner = progress["done"] / progress["total"] if progress["total"] else 0.0
        progress["fraction"] = round(min(1.0, (progress["step"] - 1 + inner) / max(1, progress["steps"])), 4)

    def _save(self, force: bool = False) -> None:
        if force or time.monotonic() - self.saved > 0.5:
            _save(self.run_root, self.record)
            self.saved = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("kstory"):
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not break the job
            return
        with self.guard:
            progress = self.record["progress"]
            progress["text"] = message.splitlines()[0][:200] if message else progress["text"]
            for pattern, kind in _PATTERNS:
                match = pattern.search(message)
                if not match:
                    continue
                if kind == "steps":
                    progress["done"], progress["total"] = int(match.group(1)), int(match.group(2))
                elif kind == "frames_total":
                    progress["done"], progress["total"] = 0, int(match.group(2))
                elif kind == "frames_done":
                    progress["done"] += len([n for n in match.group(1).split(",") if n.strip()])
                    if progress["total"]:  # a re-roll's batch companions are made again but not counted
                        progress["done"] = min(progress["done"], progress["total"])
                    else:
                        progress["text"] = f"{progress['done']} frame(s) done"
                if kind != "steps" and progress["total"]:
                    progress["text"] = f"frame {progress['done']} of {progress['total']}"
                break
            self._fraction()
            self._save()


def _scrub(text: str | None) -> str | None:
    """``text`` without the values of the secret environment variables."""
    if text is None:
        return None
    for name in SECRET_ENVS:
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text


def _run_step(step: dict[str, Any]) -> tuple[int, str | None]:
    """Run one step; returns its exit status and its result in words (for a function step)."""
    if "argv" in step:
        from kstory.cli import main as cli_main

        return cli_main([str(part) for part in step["argv"]]), None
    module, _, name = step["call"].partition(":")
    result = getattr(importlib.import_module(module), name)(**(step.get("kwargs") or {}))
    if result is not None:
        print(_scrub(str(result)), flush=True)
    return 0, None if result is None else _scrub(str(result))


def _last_error_line(log_path: Path) -> str | None:
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")[-20_000:]
    except OSError:
        return None
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("error: ")]
    if not starts:
        return None
    block = [lines[starts[-1]].removeprefix("error: ")]
    for line in lines[starts[-1] + 1:]:  # the message's own continuation lines and its fix
        if not (line.startswith((" ", "\t", "fix:"))):
            break
        block.append(line)
    return "\n".join(block)


def run_job(run_root: Path, job_id: str) -> int:
    """The job process: run the steps under the run's lock, keeping job.json up to date."""
    from kstory.core.logs import setup_console

    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C semantics even if the parent ignored it
    run_root = Path(run_root).absolute()
    record = json.loads((job_dir(run_root, job_id) / "job.json").read_text(encoding="utf-8"))
    record.update(state="running", pid=os.getpid(), pid_started=process_start_time(os.getpid()),
                  started_at=_now(), host=socket.gethostname())
    _save(run_root, record)
    setup_console()
    progress = _Progress(run_root, record)
    logging.getLogger().addHandler(progress)
    status, error, result = 0, None, None
    try:
        with run_lock(run_root, f"job {job_id}: {record['command']}"):
            for index, step in enumerate(record["steps"]):
                progress.step(index, describe_step(step))
                status, result = _run_step(step)
                if status != 0:
                    break
    except KeyboardInterrupt:
        status = 130
    except KstoryError as exc:
        status, error = 2, exc.render()
        print(f"error: {error}", file=sys.stderr, flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded as the job's failure
        traceback.print_exc()
        status, error = 1, f"unexpected {type(exc).__name__}: {exc}"
    finally:
        logging.getLogger().removeHandler(progress)
    sys.stdout.flush()
    sys.stderr.flush()
    if status != 0 and error is None and status != 130:
        error = _last_error_line(job_dir(run_root, job_id) / "log.txt") or f"exit status {status}"
    with progress.guard:
        state = "done" if status == 0 else "cancelled" if status == 130 else "failed"
        if state == "done":
            record["progress"].update(step=record["progress"]["steps"], fraction=1.0)
            if record["progress"]["total"]:
                record["progress"]["done"] = record["progress"]["total"]
        record.update(state=state, exit_status=status, error=_scrub(error), result=result, finished_at=_now())
        _save(run_root, record)
    _scrub_file(job_dir(run_root, job_id) / "log.txt")
    return status


def _scrub_file(path: Path) -> None:
    """Rewrite the log without secret values, should a library have printed one."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return
    clean = _scrub(text)
    if clean != text:
        atomic.write_text(path, clean)


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1]), sys.argv[2]))
