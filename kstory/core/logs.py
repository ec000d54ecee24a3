"""Logging: short lines on the terminal, everything (with tracebacks) in the run's log file.

The terminal never shows a traceback unless ``--debug``: a record logged with
``exc_info`` prints its message only, while the log file keeps the traceback.
A record logged with ``extra=FILE_ONLY`` goes to the log file alone (the CLI
prints the error itself, once).

Handlers sit on the root logger so the stage packages (``kstory.prep``,
``kstory.train``, ...) and libraries all end up in the run's log file. The terminal
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

from kstory.core.errors import KstoryError
from kstory.core.oserrors import os_fault, os_faults_as_user_errors
from kstory.core.ranks import rank_label

LOGGER_NAME = "kstory"
OUR_PACKAGES = frozenset({"kstory"})
_FILE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
FILE_ONLY = {"kstory_file_only": True}


def get_logger(name: str | None = None) -> logging.Logger:
    """The project logger, or a child of it (``kstory.prep``...)."""
    return logging.getLogger(LOGGER_NAME if not name else f"{LOGGER_NAME}.{name}")


# Libraries that narrate routine work at WARNING (no GPU found, paths they will create...).
CHATTY_LIBRARIES = frozenset({"data_juicer"})


class _OursOrWarnings(logging.Filter):
    """Let through our packages' messages, warnings of quiet libraries, errors of chatty ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "kstory_file_only", False):
            return False
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


class _MessageOnly(logging.Formatter):
    """The message without the traceback or stack a record may carry (those belong in the log file)."""

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record = logging.makeLogRecord(record.__dict__)  # the file handler still gets the original
            record.exc_info = record.exc_text = record.stack_info = None
        return super().format(record)


def setup_console(verbose: bool = False, debug: bool = False) -> None:
    """Send INFO (or DEBUG) messages of kstory's packages to stderr, without timestamps.

    Tracebacks attached to log records are shown only with ``debug``.
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
    label = rank_label()  # the other processes of a multi-process training say which they are
    line = f"[{label}] %(message)s" if label else "%(message)s"
    handler.setFormatter(logging.Formatter(line) if debug else _MessageOnly(line))
    handler.addFilter(_OursOrWarnings())
    handler._kstory_console = True  # type: ignore[attr-defined]
    root.addHandler(handler)


class _RunLogHandler(logging.FileHandler):
    """A file handler that keeps a failed write (full disk...) to report once, instead of a traceback per record."""

    failure: BaseException | None = None

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if self.failure is None:
            self.failure = sys.exc_info()[1]


@contextlib.contextmanager
def log_to_file(path: Path) -> Iterator[Path]:
    """Append everything logged inside the block to ``path`` (the run's log file).

    A log that could not be written is an error at the end of the block (when
    nothing else went wrong first), so a run never ends "fine" with its log lost.
    """
    with os_faults_as_user_errors(path, action="could not open the run's log"):
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _RunLogHandler(path, encoding="utf-8")
    root = logging.getLogger()
    if root.level > logging.INFO or root.level == logging.NOTSET:
        root.setLevel(logging.INFO)
    for package in OUR_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG)
    handler.setLevel(logging.DEBUG)
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        try:
            handler.close()
        except OSError as error:  # the last flush
            handler.failure = handler.failure or error
    if handler.failure is not None:
        action = "could not write the run's log (the outputs themselves are complete)"
        raise os_fault(handler.failure, path, action=action) or KstoryError(
            f"{action}: {handler.failure}", path=path, fix="check the disk holding it, then run the same command again"
        )
