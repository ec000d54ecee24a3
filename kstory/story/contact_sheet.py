"""A contact sheet of the story: every frame in order with its guide, seed and score, in one picture.

People would rather look at eight frames side by side than read a manifest;
the demo writes one to ``story/contact_sheet.png`` and points at it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageOps

from kstory.core.atomic import write_bytes
from kstory.core.errors import KstoryError
from kstory.story.manifest import png_bytes, read_manifest

CELL = 256  # frame thumbnail side
GUIDE = 96  # guide thumbnail side
TEXT_HEIGHT = 40
COLUMNS = 4
BACKGROUND = (245, 245, 245)


def _thumbnail(path: Path, side: int) -> Image.Image:
    """The picture scaled to fit a ``side`` square, up or down (small test frames are enlarged too)."""
    with Image.open(path) as image:
        return ImageOps.contain(image.convert("RGB"), (side, side))


def write_contact_sheet(story_dir: Path, out: Path, scores: dict[str, Any] | None = None) -> Path:
    """Draw the story's frames (manifest order) with their first guide, seed and aesthetic score into ``out``."""
    story_dir = Path(story_dir)
    manifest = read_manifest(story_dir)
    if manifest is None:
        raise KstoryError("no manifest.json: nothing to draw", path=story_dir, fix="generate the story first")
    by_name = {Path(str(i.get("file", ""))).name: i for i in (scores or {}).get("images", [])}
    frames = sorted(manifest["frames"].items(), key=lambda kv: int(kv[0]))
    rows = (len(frames) + COLUMNS - 1) // COLUMNS
    sheet = Image.new("RGB", (COLUMNS * CELL, rows * (CELL + TEXT_HEIGHT)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    for position, (key, frame) in enumerate(frames):
        x, y = (position % COLUMNS) * CELL, (position // COLUMNS) * (CELL + TEXT_HEIGHT)
        sheet.paste(_thumbnail(story_dir / frame["file"], CELL), (x, y))
        guides = frame.get("guides") or []
        if guides and (story_dir / guides[0]["file"]).is_file():
            guide = _thumbnail(story_dir / guides[0]["file"], GUIDE)
            sheet.paste(guide, (x + CELL - guide.width - 4, y + CELL - guide.height - 4))
        score = by_name.get(Path(frame["file"]).name, {}).get("aesthetic")
        shown = f"aesthetic {score:.2f}" if isinstance(score, (int, float)) else "not scored"
        guide_kind = guides[0]["kind"] if guides else "no guide"
        draw.text((x + 6, y + CELL + 4), f"{key}. seed {frame['seed']}  {shown}", fill=(20, 20, 20))
        draw.text((x + 6, y + CELL + 20), f"guide: {guide_kind}", fill=(90, 90, 90))
    write_bytes(Path(out), png_bytes(sheet))
    return Path(out)
