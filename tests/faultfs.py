"""Real file-system faults for tests: a small tmpfs that can be filled up or remounted read-only.

Mounting needs root (or CAP_SYS_ADMIN); where it is not permitted the test is
skipped with the reason. Root ignores permission bits, so a read-only folder
has to be a read-only mount, not a chmod.
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path`` for the block; skip the test if mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = _mount("-t", "tmpfs", "-o", f"size={size}", "kstory-test", str(path))
    except FileNotFoundError:
        pytest.skip("no `mount` command: cannot make a real full or read-only file system")
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def set_read_only(path: Path, read_only: bool = True) -> None:
    """Remount the tmpfs at ``path`` read-only (or writable again)."""
    done = _mount("-o", f"remount,{'ro' if read_only else 'rw'}", str(path))
    assert done.returncode == 0, done.stderr


def fill(folder: Path) -> Path:
    """Write a filler file in ``folder`` until the file system is full; return it (delete it to free the space)."""
    filler = folder / "filler.bin"
    chunk = b"\0" * (64 * 1024)
    with open(filler, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    with contextlib.suppress(OSError), open(filler, "ab", buffering=0) as handle:  # the last partial page
        while handle.write(b"\0"):
            pass
    return filler
