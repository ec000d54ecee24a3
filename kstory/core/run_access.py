"""Safe access to the runs root: typed paths stay inside it, broken files become messages, not crashes."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def resolve_run(runs_root: Path, typed: str | Path) -> Path:
    """The run folder ``typed`` names, which must lie inside ``runs_root`` (KstoryError otherwise).

    ``typed`` may be a bare name (``demo``) or a path; ``..``, absolute paths
    elsewhere and symlinks pointing out of the root are refused.
    """
    root = Path(runs_root).resolve()
    text = str(typed).strip()
    if not text:
        raise KstoryError("no run given", fix="pick a run or type its name")
    if "\x00" in text:
        raise KstoryError("the run name contains a NUL character", fix="type a plain folder name")
    candidate = Path(text)
    target = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if target == root or not target.is_relative_to(root):
        raise KstoryError(f"{text!r} is outside the runs root", path=root,
                          fix="pick a run folder inside the runs root")
    return target


def new_run_name(name: str) -> str:
    """``name`` if it is a valid new run folder name (letters, digits, '_', '.', '-'), else KstoryError."""
    name = name.strip()
    if not _RUN_NAME.match(name) or name in {".", ".."} or ".." in name:
        raise KstoryError(f"{name!r} is not a valid run name",
                          fix="use letters, digits, '_', '.' and '-' (at most 64, starting with a letter or digit)")
    return name


def list_runs(runs_root: Path) -> list[str]:
    """Names of the folders in ``runs_root`` that look like runs (have a config or any stage output)."""
    root = Path(runs_root)
    if not root.is_dir():
        return []
    names = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        run = RunDir(child)
        if any(p.exists() for p in (run.config, run.data, run.lora, run.story, run.scores, run.submission)):
            names.append(child.name)
    return names


def inside(base: Path, relative: str | Path) -> Path | None:
    """``base / relative`` if it stays inside ``base`` (a file reference read from a run file), else None."""
    try:
        base = Path(base).resolve()
        target = (base / relative).resolve()
    except (OSError, ValueError):
        return None
    return target if target.is_relative_to(base) else None


@dataclass
class Loaded:
    """A run file read for display: its data, or the problem that stopped it."""

    path: Path
    data: Any = None
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def read_json(path: Path, what: str, produced_by: str) -> Loaded:
    """Read a JSON run file; a missing or corrupt file gives a ``problem`` saying what to run."""
    if not path.is_file():
        return Loaded(path, problem=f"{what} is missing ({path.name}): run `{produced_by}` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return Loaded(path, problem=f"{what} ({path.name}) is unreadable: {error}; run `{produced_by}` again")
    if not isinstance(data, dict):
        return Loaded(path, problem=f"{what} ({path.name}) is not a JSON object; run `{produced_by}` again")
    return Loaded(path, data=data)


def read_csv(path: Path, what: str, produced_by: str) -> Loaded:
    """Read a CSV run file into a list of dicts (same ``problem`` rules as :func:`read_json`)."""
    if not path.is_file():
        return Loaded(path, problem=f"{what} is missing ({path.name}): run `{produced_by}` first")
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, ValueError, csv.Error) as error:
        return Loaded(path, problem=f"{what} ({path.name}) is unreadable: {error}; run `{produced_by}` again")
    return Loaded(path, data=rows)


@dataclass
class RunOverview:
    """Which documented files of a run exist, for the Runs page."""

    root: Path
    present: dict[str, bool] = field(default_factory=dict)


def overview(root: Path) -> RunOverview:
    """Presence of each stage's documented output in the run at ``root``."""
    run = RunDir(root)
    files = {
        "config (kstory.yaml)": run.config,
        "data/report.json": run.data / "report.json",
        "lora/loss.csv": run.lora / "loss.csv",
        "lora/lora.safetensors": run.lora / "lora.safetensors",
        "story/manifest.json": run.story / "manifest.json",
        "scores.json": run.scores,
        "submission/README.md": run.submission / "README.md",
    }
    return RunOverview(root, {name: path.is_file() for name, path in files.items()})
