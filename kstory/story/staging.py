"""The story folder changes only by swapping in a finished staging folder.

Every write of the story stage (a full run, ``--frames``, a re-roll) goes to
``.<name>.staging/`` beside the story folder. Only when every frame of the
operation is done is the current folder moved to the run's ``.history/`` and
the staging folder renamed into its place, so an interrupted run never leaves
a story whose frames and manifest disagree, and the previous story is never
lost. A staging folder left by an interrupted run is picked up again by the
next run, which keeps its finished frames when their inputs are unchanged.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from kstory.core.logs import get_logger
from kstory.core.rundir import RunDir, move_to_history

log = get_logger("story")


def staging_dir(out_dir: Path) -> Path:
    """Where an operation on ``out_dir`` builds its result (same filesystem, so the swap is a rename)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.staging")


def link_or_copy(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target``: a hard link where possible (files are replaced by rename, never
    written in place, so a link never lets a later write reach the history), else a copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def commit(out_dir: Path, staging: Path) -> Path | None:
    """Swap ``staging`` in as ``out_dir``; the previous folder goes to the run's ``.history/``.

    Returns where the previous story went (None when there was none).
    """
    out_dir = Path(out_dir)
    previous = move_to_history(RunDir(out_dir.parent), out_dir) if out_dir.exists() else None
    staging.rename(out_dir)
    if previous is not None:
        log.info("previous story kept at %s", previous)
    return previous


def set_aside(out_dir: Path, staging: Path) -> Path | None:
    """Move a staging folder this operation cannot use into the run's ``.history/`` (it may hold the only
    copy of frames an interrupted run made)."""
    return move_to_history(RunDir(Path(out_dir).parent), staging) if staging.exists() else None
