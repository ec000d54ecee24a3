"""Which Data-Juicer executor runs the recipe: ``default`` (in this process) or ``ray``."""

from __future__ import annotations

import logging

from kstory.core.errors import KstoryError
from kstory.core.ray_cluster import ray_installed

log = logging.getLogger(__name__)

DEFAULT_EXECUTOR = "default"
RAY = "ray"
EXECUTORS = (DEFAULT_EXECUTOR, RAY)


def choose_executor(requested: str) -> str:
    """The executor to use: ``ray`` only when asked for and installed (else in-process, said once in the log)."""
    if requested not in EXECUTORS:
        raise KstoryError(
            f"prep.executor is {requested!r}", fix=f"set prep.executor (--executor) to one of {', '.join(EXECUTORS)}"
        )
    if requested == RAY and not ray_installed():
        log.warning("prep.executor is ray but Ray is not installed: running Data-Juicer in this process "
                    "(pip install 'ray[data]' to use a cluster)")
        return DEFAULT_EXECUTOR
    return requested
