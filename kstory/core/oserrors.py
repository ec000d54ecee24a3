"""Turn the operating system's refusals to write into messages a user can act on.

A read-only folder, a permission problem, a full disk or a too-long path are
not bugs: they must read "disk full: runs/mine/lora ... fix: free space", not
"unexpected OSError ... please report it". Python raises them as ``OSError``;
safetensors raises its own ``SafetensorError`` whose text carries the same
"(os error N)", so both are recognised here, in one place, for the atomic
writers, training's checkpoints and the CLI's last-resort handler.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Iterator
from pathlib import Path

from safetensors import SafetensorError

from kstory.core.errors import KstoryError

# errno -> (what happened, how to fix it); {where} is the folder the write was going to.
_FAULTS: dict[int, tuple[str, str]] = {
    errno.EROFS: ("read-only file system",
                  "the disk holding {where} is mounted read-only: remount it writable or choose an output folder "
                  "on a writable disk"),
    errno.EACCES: ("permission denied",
                   "make {where} writable for your user (ls -ld shows its owner) or choose another output folder"),
    errno.EPERM: ("operation not permitted",
                  "make {where} writable for your user (ls -ld shows its owner) or choose another output folder"),
    errno.ENOSPC: ("disk full",
                   "free space on the disk holding {where} (df -h shows it) or choose an output folder on another "
                   "disk, then run the same command again"),
    errno.EDQUOT: ("disk quota exceeded",
                   "free space within your quota on the disk holding {where}, or choose an output folder on another "
                   "disk, then run the same command again"),
    errno.ENAMETOOLONG: ("path too long",
                         "use a shorter run name, output folder or file name"),
    errno.ENOTDIR: ("a part of the path is a file, not a folder",
                    "move that file out of the way or choose another output folder"),
}
USER_FIXABLE_ERRNOS = frozenset(_FAULTS)
_OS_ERROR_IN_TEXT = re.compile(r"\(os error (\d+)\)")
_PATH_IN_TEXT = re.compile(r'at path "([^"]+)"')


def fault_errno(error: BaseException) -> int | None:
    """The errno behind ``error``: an ``OSError``'s own, or the "(os error N)" safetensors writes in its text."""
    if isinstance(error, OSError):
        return error.errno
    if isinstance(error, SafetensorError):
        match = _OS_ERROR_IN_TEXT.search(str(error))
        return int(match.group(1)) if match else None
    return None


def os_fault(error: BaseException, path: str | Path | None = None, *, action: str = "could not write",
             near: str | Path | None = None) -> KstoryError | None:
    """A ``KstoryError`` naming the path and the fix when ``error`` is a write the user can make possible, else None.

    ``path`` is what was being written (default: the file the error names;
    ``near`` is the folder the fix mentions when neither says, as a write to
    an open file names none). ``__cause__`` is followed, so a library's
    wrapper around such an error maps too.
    """
    seen = 0
    while error is not None and seen < 8:
        code = fault_errno(error)
        if code in _FAULTS:
            what, fix = _FAULTS[code]
            where = _public(Path(path)) if path is not None else _named_path(error)
            folder = Path(near) if where is None and near is not None else (
                None if where is None else where if _is_dir(where) else where.parent)
            detail = os.strerror(code)
            message = f"{action}: {what}" + (f" ({detail})" if detail.lower() != what else "")
            return KstoryError(message, path=where, fix=fix.format(where=folder if folder is not None else "the output folder"))
        error, seen = error.__cause__, seen + 1
    return None


_STAGING_NAME = re.compile(r"^\.(.+)\.[^.]+\.(?:partial|tmp)$")  # kstory.atomic's and tempfile's names


def _named_path(error: BaseException) -> Path | None:
    """The path the error names, with a staging name (.lora.x1y2.tmp) turned back into its target (lora)."""
    if isinstance(error, OSError) and error.filename:
        path = Path(os.fsdecode(error.filename))
    else:
        match = _PATH_IN_TEXT.search(str(error))
        if not match:
            return None
        path = Path(match.group(1))
    if re.fullmatch(r"\.tmp\w+", path.name):  # safetensors' own temporary file: name its folder
        path = path.parent
    return _public(path)


def _public(path: Path) -> Path:
    """``path`` with staging names turned back into the names the user will see (.lora.x1y2.tmp -> lora)."""
    parts = [(match.group(1) if (match := _STAGING_NAME.match(part)) else part) for part in path.parts]
    return Path(*parts) if parts else path


@contextlib.contextmanager
def os_faults_as_user_errors(path: str | Path | None = None, *, action: str = "could not write") -> Iterator[None]:
    """Re-raise a user-fixable OS fault inside the block as a ``KstoryError`` about ``path``; others pass untouched."""
    try:
        yield
    except KstoryError:
        raise  # already says what and where
    except Exception as error:
        fault = os_fault(error, path, action=action)
        if fault is None:
            raise
        raise fault from error


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a path too long to even look at
        return False
