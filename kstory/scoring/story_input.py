"""``kstory score RUN`` or ``kstory score RUN/story``: the story's frames and prompts, from its manifest.

A run folder (holding ``story/manifest.json``) or a story folder (holding
``manifest.json``) is scored frame by frame in story order, with each frame's
prompt for CLIP-T, and its scores go to the run's ``scores.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kstory.core.errors import KstoryError

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class StoryFrames:
    run_dir: Path  # the run the story belongs to (the story folder's parent)
    frames: list[Path]
    prompts: dict[str, str]  # frame file name -> prompt

    @property
    def scores_path(self) -> Path:
        return self.run_dir / "scores.json"


def story_folder(path: Path) -> Path | None:
    """The story folder ``path`` names: itself (holding manifest.json) or ``path/story`` of a run folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if (path / "story" / MANIFEST).is_file():
        return path / "story"
    return None


def story_frames(story: Path) -> StoryFrames:
    """Every frame the manifest of ``story`` lists, in story order, with its prompt."""
    manifest_path = story / MANIFEST
    fix = "generate the story again with `kstory story` (or `kstory run`)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        frames = manifest["frames"]
        ordered = sorted(frames.items(), key=lambda kv: int(kv[0]))
        files = [story / frame["file"] for _, frame in ordered]
        prompts = {Path(frame["file"]).name: str(frame["prompt"]) for _, frame in ordered}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise KstoryError(f"unreadable story manifest ({type(error).__name__}: {error})", path=manifest_path,
                          fix=fix) from None
    if not files:
        raise KstoryError("the story manifest lists no frames", path=manifest_path, fix=fix)
    root = story.resolve()
    for file in files:
        if not file.resolve().is_relative_to(root):
            raise KstoryError(f"the manifest names a frame outside the story folder: {file}", path=manifest_path, fix=fix)
        if not file.is_file():
            raise KstoryError("a frame the manifest lists is missing", path=file, fix=fix)
    return StoryFrames(run_dir=story.resolve().parent, frames=files, prompts=prompts)
