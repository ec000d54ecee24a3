"""One writer at a time per run: ``RUN/.lock.json`` names the process that is changing the run.

Two commands writing into the same run (a re-roll while ``kstory run``
re-scores, two dashboard tabs packaging) would mix their outputs. The lock
holds the writer's pid and the kernel's start time of that process, so a lock
left behind by a process that died (pid gone, or reused by another process)
is recognised as stale and recovered instead of blocking the run for ever.
The same process may take the lock again (a job that calls a command).
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger

LOCK_NAME = ".lock.json"
RUN_OUTPUTS = frozenset({"data", "lora", "story", "submission", "scores.json"})
log = get_logger("lock")
_held: dict[Path, int] = {}  # lock file -> how many times this process took it


def process_start_time(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc/PID/stat field 22), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    if fields[:1] in (["Z"], ["X"]):
        return None  # finished, only waiting to be reaped
    try:
        return int(fields[19])  # field 22 overall; fields here start at field 3
    except (IndexError, ValueError):
        return None


def is_alive(pid: Any, start_time: Any) -> bool:
    """Whether the process ``pid`` that started at ``start_time`` still runs (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    current = process_start_time(pid)
    return current is not None and (start_time is None or current == start_time)


def run_folder_for(output: str | Path) -> Path | None:
    """The run folder an output path belongs to: the parent of data/, lora/, story/, submission/ or
    scores.json, or a folder holding kstory.yaml (the output itself or its parent); None otherwise."""
    output = Path(output).absolute()
    if output.name in RUN_OUTPUTS:
        return output.parent
    for folder in (output, output.parent):
        if (folder / "kstory.yaml").is_file():
            return folder
    return None


def read_lock(run_root: Path) -> dict[str, Any] | None:
    """The lock record of ``run_root``, or None when there is none (an unreadable one counts as stale)."""
    path = Path(run_root) / LOCK_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"pid": None, "command": "(unreadable lock file)"}
    return record if isinstance(record, dict) else {"pid": None, "command": "(unreadable lock file)"}


def holder_alive(record: dict[str, Any]) -> bool:
    """Whether the lock's holder still runs; a holder on another host is assumed alive (it cannot be checked)."""
    if record.get("host") not in (None, socket.gethostname()):
        return True
    return is_alive(record.get("pid"), record.get("started"))


def describe(record: dict[str, Any]) -> str:
    """The holder in words: its command, pid, host and since when."""
    return (f"`{record.get('command', '?')}` (pid {record.get('pid', '?')} on {record.get('host', '?')}, "
            f"since {record.get('since', '?')})")


def _create(path: Path, record: dict[str, Any]) -> bool:
    """Create the lock file with its content in one step; False if it already exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    try:
        os.link(tmp, path)  # atomic, and fails when another writer got there first
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def _own(record: dict[str, Any] | None) -> bool:
    return record is not None and record.get("pid") == os.getpid() and \
        record.get("host") == socket.gethostname() and record.get("started") == process_start_time(os.getpid())


def acquire(run_root: Path, command: str) -> None:
    """Take the run's lock for this process; raise KstoryError naming the holder when another one has it."""
    run_root = Path(run_root).resolve()  # one key per folder, however the command spelled it
    path = run_root / LOCK_NAME
    if path in _held:
        _held[path] += 1
        return
    run_root.mkdir(parents=True, exist_ok=True)
    record = {"pid": os.getpid(), "started": process_start_time(os.getpid()), "host": socket.gethostname(),
              "command": command, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(3):
        if _create(path, record):
            _held[path] = 1
            return
        current = read_lock(run_root)
        if current is None:
            continue  # released in between: try again
        if _own(current):
            _held[path] = 1
            return
        if holder_alive(current):
            raise KstoryError(f"the run is busy: {describe(current)} is writing into it", path=run_root,
                              fix="wait for it to finish or cancel it (`kstory status "
                              f"{run_root}` shows it); delete {LOCK_NAME} only if that process is really gone")
        log.warning("recovered a stale lock of %s: %s (the process is gone)", run_root, describe(current))
        if read_lock(run_root) == current:  # still the stale one, not a lock another recoverer just made
            path.unlink(missing_ok=True)
    raise KstoryError("could not take the run's lock: other commands keep taking it", path=path,
                      fix="wait for them to finish, then run the command again")


def release(run_root: Path) -> None:
    """Give the lock back (the outermost release of this process removes the file)."""
    path = Path(run_root).resolve() / LOCK_NAME
    depth = _held.get(path, 0)
    if depth > 1:
        _held[path] = depth - 1
        return
    _held.pop(path, None)
    if _own(read_lock(path.parent)):
        path.unlink(missing_ok=True)


@contextmanager
def run_lock(run_root: Path | None, command: str) -> Iterator[None]:
    """Hold ``run_root``'s lock around a block; ``None`` (no run folder) holds nothing."""
    if run_root is None:
        yield
        return
    acquire(run_root, command)
    try:
        yield
    finally:
        release(run_root)
