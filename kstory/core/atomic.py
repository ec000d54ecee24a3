"""Atomic writes: a reader sees the old file or the new one, never half of either.

Every file a stage publishes goes through here, so an interrupted run (Ctrl-C,
full disk, killed job) leaves no truncated output behind that a later stage or
a resume could mistake for finished work. A write the operating system refuses
for a reason the user can fix (read-only disk, permissions, full disk, path too
long) is raised as a ``KstoryError`` naming the target (``kstory.oserrors``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kstory.core.oserrors import os_faults_as_user_errors


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` on success.

    The result gets ordinary permissions (0666 less the umask), not mkstemp's
    private 0600, so published files read like any other file the user writes.
    """
    target = Path(target)
    with os_faults_as_user_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp = Path(tmp_name)
    try:
        with os_faults_as_user_errors(target):
            yield tmp
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_bytes(target: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    return Path(target)


def write_text(target: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    return write_bytes(target, text.encode("utf-8"))


def write_json(target: str | Path, payload: Any) -> Path:
    """Write ``payload`` as pretty, key-stable JSON atomically."""
    return write_text(target, json.dumps(payload, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


def copy_file(source: str | Path, target: str | Path) -> Path:
    """Copy ``source`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
    return Path(target)


@contextlib.contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Build a directory in a sibling staging folder and move it into place at the end.

    ``target`` must not exist yet; callers decide what to do with an old one
    (refuse, or move it aside) so nothing is overwritten silently.
    """
    target = Path(target)
    if target.exists():
        raise FileExistsError(target)
    with os_faults_as_user_errors(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        with os_faults_as_user_errors(target):
            yield staging
            os.chmod(staging, 0o777 & ~_umask())
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
