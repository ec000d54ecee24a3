"""A contact sheet of the search: each searched frame's candidates in a row, best first, the pick framed.

Judges (and the entrant) can see that the picks came from an honest search:
every candidate rendered at full quality is shown with its seed and scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from kstory.core.atomic import write_bytes
from kstory.story.candidates import FULL, INDEX, candidates_dir
from kstory.story.manifest import png_bytes, read_manifest

CELL = 128
TEXT_HEIGHT = 30
LABEL_WIDTH = 60
BACKGROUND = (245, 245, 245)
PICK = (200, 30, 30)


def _files(story_dir: Path) -> dict[tuple[int, int], Path]:
    """(frame, seed) -> the full-quality candidate's picture in ``candidates/``."""
    folder = candidates_dir(story_dir)
    try:
        index = json.loads((folder / INDEX).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {(c["frame"], c["seed"]): folder / c["file"] for c in index.get("candidates", []) if c["quality"] == FULL}


def write_candidate_sheet(story_dir: Path, out: Path) -> Path | None:
    """Draw every searched frame's full-quality candidates into ``out``; None when the story was never searched."""
    story_dir = Path(story_dir)
    manifest = read_manifest(story_dir) or {"frames": {}}
    rows = [(int(k), f) for k, f in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0])) if f.get("search")]
    if not rows:
        return None
    files = _files(story_dir)
    entries = {i: sorted((c for c in f["search"]["candidates"] if c["quality"] == FULL),
                         key=lambda c: -c["aesthetic"]) for i, f in rows}
    columns = max(len(e) for e in entries.values())
    sheet = Image.new("RGB", (LABEL_WIDTH + columns * CELL, len(rows) * (CELL + TEXT_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for row, (index, frame) in enumerate(rows):
        y = row * (CELL + TEXT_HEIGHT)
        draw.text((6, y + CELL // 2), f"frame {index}", fill=(20, 20, 20))
        for column, candidate in enumerate(entries[index]):
            x = LABEL_WIDTH + column * CELL
            path = (story_dir / frame["file"]) if candidate["seed"] == frame["seed"] else files.get((index, candidate["seed"]))
            _paste(sheet, draw, path, x, y)
            if candidate["seed"] == frame["search"]["pick"]:
                draw.rectangle([x, y, x + CELL - 1, y + CELL - 1], outline=PICK, width=3)
            draw.text((x + 4, y + CELL + 2), f"seed {candidate['seed'] % 10**6}", fill=(20, 20, 20))
            draw.text((x + 4, y + CELL + 15), _scores(candidate), fill=(90, 90, 90))
    write_bytes(Path(out), png_bytes(sheet))
    return Path(out)


def _paste(sheet: Image.Image, draw: ImageDraw.ImageDraw, path: Path | None, x: int, y: int) -> None:
    if path is not None and path.is_file():
        with Image.open(path) as image:
            sheet.paste(ImageOps.contain(image.convert("RGB"), (CELL, CELL)), (x, y))
    else:
        draw.text((x + 8, y + CELL // 2), "not on disk", fill=(120, 120, 120))


def _scores(candidate: dict[str, Any]) -> str:
    text = f"aes {candidate['aesthetic']:.2f}"
    if candidate.get("clip_t") is not None:
        text += f" T {candidate['clip_t']:.2f}"
    return text
