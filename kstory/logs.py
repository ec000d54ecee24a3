"""Logging: short lines on the terminal, everything (with tracebacks) in the run's log file.

Handlers sit on the root logger so the stage packages (``data_prep``,
``train``, ...) and libraries all end up in the run's log file. The terminal
shows kstory's own messages and only warnings from libraries; several
Data-Juicer op modules call ``logging.basicConfig`` at import, which is a
no-op once the root logger has our handler.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

LOGGER_NAME = "kstory"
OUR_PACKAGES = frozenset({"kstory", "data_prep", "train", "story", "scoring", "submissions", "app"})
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def get_logger(name: str | None = None) -> logging.Logger:
    """The project logger, or a child of it (``kstory.prep``...)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


# Libraries that narrate routine work at WARNING (no GPU found, paths they will create...).
CHATTY_LIBRARIES = frozenset({"data_juicer"})


class _OursOrWarnings(logging.Filter):
    """Let through our packages' messages, warnings of quiet libraries, errors of chatty ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        package = record.name.split(".", 1)[0]
        if package in OUR_PACKAGES:
            return True
        return record.levelno >= (logging.ERROR if package in CHATTY_LIBRARIES else logging.WARNING)


def route_loguru() -> None:
    """Send loguru (Data-Juicer's logger) through ``logging`` instead of straight to stderr.

    ``import data_juicer`` re-adds a stderr sink, so call this again right after that import.
    """
    try:
        from loguru import logger
    except ImportError:
        return

    def to_logging(message) -> None:
        record = message.record
        level = logging.getLevelName(record["level"].name)
        logging.getLogger(record["name"] or "loguru").log(level if isinstance(level, int) else logging.INFO,
                                                          record["message"])

    logger.remove()
    logger.add(to_logging, level="DEBUG", format="{message}")


def setup_console(verbose: bool = False) -> None:
    """Send INFO (or DEBUG) messages of kstory's packages to stderr, without timestamps.

    Libraries' own progress bars (datasets' per-op bars) are turned off unless
    ``verbose``: kstory draws one bar per stage step instead.
    """
    if not verbose:
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    route_loguru()
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG)
    for handler in list(root.handlers):
        if getattr(handler, "_kstory_console", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.addFilter(_OursOrWarnings())
    handler._kstory_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
    """Append everything logged inside the block to ``path`` (the run's log file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
