"""Undo a frame's last repair: the frame as it was before, taken back from the run's ``.history/``.

A repair swaps in a new story folder and moves the old one to ``.history/``
(kstory.story.staging), so the picture before it is still there, byte for
byte, with its manifest record. Undoing is one more story change built the
same way: every other frame is kept as it is now, this frame's record and
files come back from the history folder, and the repaired story goes to
``.history/`` in turn, so nothing is lost and the undo can itself be undone
by hand.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kstory.core.atomic import write_text
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.rundir import RunDir
from kstory.story.build import StoryBuild
from kstory.story.manifest import read_manifest
from kstory.story.spec_copy import SPEC_COPY, derive_spec_text

log = get_logger("story")


def _newest_first(folder: Path, name: str) -> list[Path]:
    """``.history/<name>-<YYYYmmdd-HHMMSS>[-n]`` folders (kstory.core.rundir.move_to_history), newest first."""
    def order(path: Path) -> tuple[str, int]:
        rest = path.name.removeprefix(f"{name}-")
        stamp, _, n = rest[:15], rest[15:16], rest[16:]
        return stamp, int(n) if n.isdigit() else 1
    return sorted((p for p in folder.glob(f"{name}-*") if p.is_dir()), key=order, reverse=True)


def before_last_repair(out_dir: Path, frame: int) -> tuple[Path, dict[str, Any]] | None:
    """(history story folder, frame record) of frame ``frame`` just before its last repair, or None."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    record = (manifest or {}).get("frames", {}).get(str(frame))
    if not record or not record.get("repairs"):
        return None
    last, earlier = record["repairs"][-1], record["repairs"][:-1]
    history = RunDir(out_dir.parent).history
    for folder in _newest_first(history, out_dir.name) if history.is_dir() else []:
        try:
            old = (read_manifest(folder) or {}).get("frames", {}).get(str(frame))
        except Exception:  # noqa: BLE001 - an unreadable history folder is simply not the one
            continue
        if not old or old.get("repairs", []) != earlier:
            continue
        if last.get("source_file") is None and old.get("sha256") != last.get("source_sha256"):
            continue
        if (folder / old["file"]).is_file():
            return folder, old
    return None


def undo_last_repair(out_dir: Path, frame: int) -> Path:
    """Put frame ``frame`` back as it was before its last repair; returns the frame's file."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None or str(frame) not in manifest.get("frames", {}):
        raise KstoryError(f"frame {frame} is not in this story", path=out_dir, fix="pick one of the story's frames")
    found = before_last_repair(out_dir, frame)
    if found is None:
        raise KstoryError(f"frame {frame} has no repair whose previous picture is in .history/", path=out_dir,
                          fix="nothing to undo (a re-roll or a full run is undone by regenerating with the old seed)")
    folder, old = found
    current = manifest["frames"][str(frame)]
    build = StoryBuild(out_dir, manifest)
    build.open()
    new = {**manifest, "frames": {}}
    for key, record in manifest["frames"].items():
        if key == str(frame):
            build.take(folder, frame, old, new)
        else:
            build.take(out_dir, int(key), record, new)
    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    history = list(current.get("seed_history", []))  # what was tried stays listed, the undo too
    history.append({"seed": old["seed"], "prompt": old["frame_prompt"], "sha256": old["sha256"], "at": at,
                    "undo": current["repairs"][-1]["kind"]})
    new["frames"][str(frame)] = {**old, "seed_history": history}
    spec_text = (out_dir / SPEC_COPY).read_text(encoding="utf-8")
    build.finish(new, lambda staging: write_text(staging / SPEC_COPY, derive_spec_text(spec_text, new)))
    log.info("frame %d: its last repair (%s) undone; the repaired story is kept in .history/", frame,
             current["repairs"][-1]["kind"])
    return out_dir / old["file"]
