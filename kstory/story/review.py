"""``story/review.json``: the reviewer's choices for a story (locked frames, order, picked checkpoint).

The dashboard writes it; the story stage reads the picked checkpoint (the LoRA
the story is made with) and ``kstory package`` the order and the locked frames.
It lives here, in the story stage, so every layer above can read it.

Format (docs/app.md)::

    {"format": "kstory-review/1", "locked": ["3", "5"], "order": ["1", "2", "4", "3", "5", "6", "7", "8"],
     "checkpoint": "step-000012"}

Frame keys are the manifest's (``"1"`` .. ``"8"``). A missing or unreadable
file means nothing is locked and the manifest's order is kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kstory.core import atomic
from kstory.core.errors import KstoryError

FILE = "review.json"
FORMAT = "kstory-review/1"
FINAL_LORA = "lora.safetensors"
CHECKPOINTS = "checkpoints"


@dataclass
class Review:
    """Locked frames and display order for one story."""

    locked: set[str] = field(default_factory=set)
    order: list[str] = field(default_factory=list)
    checkpoint: str | None = None

    def ordered(self, keys: list[str]) -> list[str]:
        """``keys`` (the manifest's frames) in the chosen order; unknown keys dropped, new ones appended."""
        known = [k for k in self.order if k in keys]
        return known + [k for k in sorted(keys, key=_frame_number) if k not in known]

    def move(self, keys: list[str], key: str, step: int) -> None:
        """Move frame ``key`` by ``step`` places (-1 earlier, +1 later) within ``keys``."""
        order = self.ordered(keys)
        i = order.index(key)
        j = min(max(i + step, 0), len(order) - 1)
        order.insert(j, order.pop(i))
        self.order = order


def _frame_number(key: str) -> int:
    return int(key) if key.isdigit() else 10**6


def load(story_dir: Path) -> Review:
    """The review of the story in ``story_dir`` (empty if missing or unreadable)."""
    path = Path(story_dir) / FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        locked = {str(k) for k in data.get("locked", [])}
        order = [str(k) for k in data.get("order", [])]
        checkpoint = data.get("checkpoint")
    except (OSError, ValueError, AttributeError, TypeError):
        return Review()
    return Review(locked=locked, order=order, checkpoint=str(checkpoint) if checkpoint else None)


def save(story_dir: Path, review: Review) -> Path:
    """Write ``review.json`` atomically (only into an existing story folder)."""
    if not Path(story_dir).is_dir():
        raise KstoryError("no story folder to keep the review in", path=story_dir,
                          fix="run `kstory story` (or `kstory run`) first")
    payload = {"format": FORMAT, "locked": sorted(review.locked, key=_frame_number), "order": review.order,
               "checkpoint": review.checkpoint}
    return atomic.write_json(Path(story_dir) / FILE, payload)


def checkpoint_lora(lora_dir: Path, checkpoint: str) -> Path:
    """``lora/checkpoints/<checkpoint>/lora.safetensors``; a name that is not one plain folder name is refused."""
    name = str(checkpoint)
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise KstoryError(f"review.json picks checkpoint {name!r}, which is not a checkpoint name",
                          fix="pick a checkpoint again on the dashboard's Training page (e.g. step-000012)")
    return Path(lora_dir) / CHECKPOINTS / name / FINAL_LORA


def story_lora(lora_dir: Path, story_dir: Path) -> tuple[Path | None, str | None]:
    """The LoRA the story is made with and the picked checkpoint's name (None: the final LoRA).

    The picked checkpoint's LoRA when ``review.json`` names one, else ``lora/lora.safetensors``
    (None when there is none). A picked checkpoint that is gone is a KstoryError: falling back
    to the final LoRA is the user's call (``kstory run --use-final-lora`` or the Training page).
    """
    picked = load(story_dir).checkpoint
    if picked:
        path = checkpoint_lora(lora_dir, picked)
        if not path.is_file():
            raise KstoryError(
                f"the picked checkpoint {picked} has no LoRA (deleted?)", path=path,
                fix="pick another checkpoint on the dashboard's Training page, or use the final LoRA: "
                    "`kstory run CONFIG --use-final-lora` (or \"Use the final LoRA\" on the Training page)")
        return path, picked
    final = Path(lora_dir) / FINAL_LORA
    return (final if final.is_file() else None), None


def drop_checkpoint(story_dir: Path) -> str | None:
    """Clear the picked checkpoint (the story goes back to the final LoRA); returns the name it had."""
    state = load(story_dir)
    picked, state.checkpoint = state.checkpoint, None
    if picked:
        save(story_dir, state)
    return picked
