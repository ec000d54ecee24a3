"""The run directory: the only way stages talk to each other.

``runs/<name>/`` holds one folder or file per stage (see docs/run-directory.md).
A stage that finishes writes a stamp into its output with a fingerprint of
everything it depended on; ``kstory run`` compares fingerprints to decide what
is up to date. Outputs that go stale are moved into ``.history/`` rather than
overwritten, so nothing a user made is ever lost.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kstory.core import atomic

STAMP_NAME = ".kstory-stage.json"


@dataclass(frozen=True)
class RunDir:
    """Paths of one run's documented files."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "kstory.yaml"

    @property
    def log(self) -> Path:
        return self.root / "kstory.log"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def lora(self) -> Path:
        return self.root / "lora"

    @property
    def story(self) -> Path:
        return self.root / "story"

    @property
    def scores(self) -> Path:
        return self.root / "scores.json"

    @property
    def submission(self) -> Path:
        return self.root / "submission"

    @property
    def history(self) -> Path:
        return self.root / ".history"

    def ensure(self) -> "RunDir":
        self.root.mkdir(parents=True, exist_ok=True)
        return self


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-serialisable parts (paths and other objects become strings)."""
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def stamp_path(output: Path) -> Path:
    """Where a stage's stamp lives: inside its folder, or beside its file."""
    return output / STAMP_NAME if output.suffix == "" else output.with_name(f".{output.name}.stamp.json")


def read_stamp(output: Path) -> dict[str, Any] | None:
    """Return the stamp of ``output``, or None when the stage never finished there."""
    path = stamp_path(output)
    if not output.exists() or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_stamp(output: Path, stage: str, digest: str, **extra: Any) -> None:
    """Mark ``output`` as the finished result of ``stage`` for inputs ``digest``."""
    from kstory import __version__

    atomic.write_json(stamp_path(output), {
        "stage": stage,
        "fingerprint": digest,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "kstory_version": __version__,
        **extra,
    })


def set_aside(path: Path) -> Path:
    """Rename ``path`` to a free ``<name>-previous-<time>`` sibling instead of deleting it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}-previous-{stamp}")
    suffix = 1
    while target.exists():
        suffix += 1
        target = path.with_name(f"{path.name}-previous-{stamp}-{suffix}")
    path.rename(target)
    return target


def _history_target(run: RunDir, name: str) -> Path:
    """A free ``.history/<name>-<YYYYmmdd-HHMMSS>[-n]`` path (the folder is made)."""
    run.history.mkdir(parents=True, exist_ok=True)
    target = run.history / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = run.history / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    return target


def move_to_history(run: RunDir, output: Path) -> Path | None:
    """Move a stale output out of the way (never delete it) and return where it went."""
    if not output.exists():
        return None
    target = _history_target(run, output.name)
    shutil.move(str(output), str(target))
    stamp = stamp_path(output)
    if stamp.exists() and stamp.parent != output:
        shutil.move(str(stamp), str(target.with_name(target.name + ".stamp.json")))
    return target


def copy_to_history(run: RunDir, path: Path) -> Path:
    """Keep a copy of the file ``path`` in ``.history/`` before it is rewritten in place (it never goes missing)."""
    target = _history_target(run, path.name)
    atomic.copy_file(path, target)
    return target
