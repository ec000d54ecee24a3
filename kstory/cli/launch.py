"""``kstory app [RUN]``: start the dashboard with Streamlit, bound to localhost only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kstory.core import run_access

MAIN = Path(__file__).resolve().parents[1] / "app" / "main.py"  # started by path: no import of the app here
RUNS_ROOT_ENV = "KSTORY_APP_RUNS_ROOT"
RUN_ENV = "KSTORY_APP_RUN"
DEFAULT_RUNS_ROOT = Path("runs")


def locate_run(run: str | None, runs_root: Path | None) -> tuple[Path | None, Path]:
    """``kstory app RUN``: the run and the runs root it opens in, for a run path or a run name.

    A bare name of a folder in the runs root (``mine``) is that run; otherwise a path that exists (``runs/mine``)
    is taken as it is, relative to the working directory; anything else is looked up as a name in the runs root.
    Without ``--runs-root``, a run path outside ``runs/`` opens in its own parent folder.
    """
    root = runs_root if runs_root is not None else DEFAULT_RUNS_ROOT
    if not run:
        return None, root
    given = Path(run).expanduser()
    if len(given.parts) == 1 and (root / given).is_dir():
        return run_access.resolve_run(root, run), root
    if given.is_dir():
        path = given.resolve()
        if runs_root is None and not path.is_relative_to(root.resolve()):
            root = path.parent
        return path, root
    return run_access.resolve_run(root, run), root


def command(port: int | None = None, address: str = "127.0.0.1") -> list[str]:
    """The ``streamlit run`` command line: localhost only, no telemetry, no browser opened by the server."""
    args = [sys.executable, "-m", "streamlit", "run", str(MAIN),
            "--server.address", address, "--server.headless", "true",
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--global.developmentMode", "false", "--client.toolbarMode", "minimal"]
    if port is not None:
        args += ["--server.port", str(port)]
    return args


def environment(run_dir: Path | None, runs_root: Path) -> dict[str, str]:
    """The environment telling kstory/app/main.py its runs root and first run (checked to lie inside the root)."""
    env = dict(os.environ)
    env[RUNS_ROOT_ENV] = str(Path(runs_root).resolve())
    env.pop(RUN_ENV, None)
    if run_dir is not None:
        run = run_access.resolve_run(runs_root, run_dir)
        env[RUN_ENV] = str(run.relative_to(Path(runs_root).resolve()))
    return env


def start(run_dir: Path | None, runs_root: Path, port: int | None = None) -> subprocess.Popen:
    """Start the server in the background (for tests and scripts); the caller stops it."""
    return subprocess.Popen(command(port), env=environment(run_dir, runs_root))


def launch(run_dir: Path | None = None, runs_root: Path = Path("runs"), port: int | None = None) -> int:
    """Run the dashboard in the foreground until Ctrl-C; returns Streamlit's exit status."""
    Path(runs_root).mkdir(parents=True, exist_ok=True)
    process = start(run_dir, runs_root, port)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
