"""Join (or start) the Ray cluster named by a setting, so prep and story can hand work to it.

One place decides how an address is reached, so an unreachable cluster is
the same clear error for every stage, and workers on this machine import
the same kstory as the caller (with its torchvision fix) whether kstory is
installed or run from a source tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError

log = logging.getLogger(__name__)

LOCAL = "local"  # start a private Ray instance on this machine for the duration of the job
AUTO = "auto"  # join the cluster started on this machine with `ray start --head`
LOCAL_OBJECT_STORE_BYTES = 200_000_000  # prep and story pass file paths and frames, not datasets


def ray_installed() -> bool:
    """Whether ``import ray`` works here."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


RAY_MODE_VARIABLE = "RAY_JOB"  # Data-Juicer's ops and tracer look for this (data_juicer.utils.constant.RAY_JOB_ENV_VAR)


def worker_runtime_env() -> dict[str, Any]:
    """What every kstory Ray worker needs; pass it to ``ray.init(runtime_env=...)`` when starting Ray yourself.

    Workers import this process's kstory (its torchvision fix in place before
    imagededup loads) and see Data-Juicer's Ray-mode switch, which its tracer
    reads in every worker.
    """
    package_root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    return {
        "env_vars": {
            "PYTHONPATH": path,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
            RAY_MODE_VARIABLE: "1",
        },
        "worker_process_setup_hook": "kstory.core.torchvision_compat.install_import_hook",
    }


@contextlib.contextmanager
def ray_cluster(address: str, *, setting: str, num_cpus: int | None = None) -> Iterator[str]:
    """Connected to Ray at ``address`` (``local``, ``auto`` or ``host:port``) for the duration of the block.

    Reuses a connection the caller already made (``ray.init`` before kstory),
    and shuts down only what it started.  Yields a description of the
    cluster for the log.  ``setting`` names the config key or flag in errors.
    """
    import ray

    if ray.is_initialized():
        yield _describe(ray)
        return
    _check_reachable(address, setting)
    kwargs: dict[str, Any] = {"runtime_env": worker_runtime_env(), "log_to_driver": False}
    if address == LOCAL:
        kwargs.update(num_cpus=num_cpus, object_store_memory=LOCAL_OBJECT_STORE_BYTES, include_dashboard=False)
    else:
        kwargs["address"] = address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        raise KstoryError(
            f"cannot reach the Ray cluster at {address!r} given by {setting}: {error}",
            fix=f"start one with `ray start --head` and set {setting} to `auto` or HOST:PORT, or to `local`",
        ) from None
    try:
        yield _describe(ray)
    finally:
        ray.shutdown()


def check_address(address: str, setting: str) -> None:
    """Fail early, before a stage writes anything, when ``address`` is malformed or a HOST:PORT does not answer."""
    if not ray_installed():
        return
    import ray

    if not ray.is_initialized():
        _check_reachable(address, setting)


def _check_reachable(address: str, setting: str) -> None:
    """A HOST:PORT that refuses connections fails here in seconds; ray.init would retry for a minute."""
    if address in (LOCAL, AUTO):
        return
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    if not host or not port.isdigit():
        raise KstoryError(
            f"{setting} is {address!r}, which is not `local`, `auto` or HOST:PORT",
            fix=f"set {setting} to `local`, `auto` or the head node's address, e.g. 10.0.0.5:6379",
        )
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise KstoryError(
            f"cannot reach the Ray cluster at {address!r} given by {setting}: {error.strerror or error}",
            fix=f"start the head with `ray start --head --port {port}` on {host}, or set {setting} to `local`",
        ) from None


def _describe(ray: Any) -> str:
    resources = ray.cluster_resources()
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return f"{nodes} node(s), {resources.get('CPU', 0):g} CPU, {resources.get('GPU', 0):g} GPU"
