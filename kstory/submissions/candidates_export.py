"""What a package shows of the search: ``candidates.json`` and ``candidates.png``.

Both are derived from the story's manifest (each searched frame's candidates,
their seeds and scores, and the pick) and the search's settings and outcome in
``candidates/index.json``; a story that was never searched ships neither.
Frames are numbered as in the story (the package's ``story_frames`` maps them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kstory.core.atomic import write_json
from kstory.story.candidate_sheet import write_candidate_sheet
from kstory.story.candidates import INDEX, candidates_dir

CANDIDATES_JSON = "candidates.json"
CANDIDATES_SHEET = "candidates.png"
FORMAT = "kstory-search/1"


def export_candidates(story_dir: Path, manifest: dict[str, Any], target: Path) -> list[str]:
    """Write the search's record into the package folder ``target``; returns the files written."""
    frames = {k: f["search"] for k, f in manifest["frames"].items() if f.get("search")}
    if not frames:
        return []
    try:
        outcome = json.loads((candidates_dir(story_dir) / INDEX).read_text(encoding="utf-8")).get("search")
    except (OSError, ValueError):
        outcome = None
    write_json(target / CANDIDATES_JSON, {"format": FORMAT, "frames": frames, "search": outcome})
    written = [CANDIDATES_JSON]
    if write_candidate_sheet(story_dir, target / CANDIDATES_SHEET) is not None:
        written.append(CANDIDATES_SHEET)
    return written
