"""Which run folder a command writes into, so every stage command appends to that run's ``kstory.log``.

A run folder is one that holds ``kstory.yaml``, or the parent of the
``data/``, ``lora/``, ``story/``, ``submission/`` or ``scores.json`` output a
command writes. Anything else (``--out some/where``) is not a run: nothing is logged to a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger, log_to_file
from kstory.core.rundir import RunDir

log = get_logger("cli")
STAGE_OUTPUTS = frozenset({"data", "lora", "story", "submission", "scores.json"})


def run_folder_of(path: str | Path) -> Path | None:
    """The run folder ``path`` is (it holds kstory.yaml) or is a stage output of; None when it is neither."""
    path = Path(path).expanduser().resolve()
    if RunDir(path).config.is_file():
        return path
    if path.name in STAGE_OUTPUTS or RunDir(path.parent).config.is_file():
        return path.parent
    return None


@contextlib.contextmanager
def logging_to_run(path: str | Path, command: str) -> Iterator[Path | None]:
    """Inside the block, append everything logged to the run's ``kstory.log`` (when ``path`` belongs to a run)."""
    run = run_folder_of(path)
    if run is None:
        yield None
        return
    with log_to_file(RunDir(run).log) as log_file:
        log.debug("kstory %s on %s", command, Path(path).expanduser().resolve())
        try:
            yield log_file
        except BaseException as exc:
            # debug: the terminal already shows the error once; the file keeps it, with the traceback of a bug
            log.debug("kstory %s stopped: %s", command, exc, exc_info=not isinstance(exc, KstoryError))
            raise
