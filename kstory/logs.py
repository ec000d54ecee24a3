"""Logging: short lines on the terminal, everything (with tracebacks) in the run's log file."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

LOGGER_NAME = "kstory"
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str | None = None) -> logging.Logger:
    """The project logger, or a child of it (``kstory.prep``...)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


def setup_console(verbose: bool = False) -> None:
    """Send INFO (or DEBUG) messages to stderr without timestamps."""
    root = get_logger()
    root.setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_kstory_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._kstory_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.propagate = False


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
    """Append everything logged inside the block to ``path`` (the run's log file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = get_logger()
    root.setLevel(logging.DEBUG)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
