"""Read the prompt of each frame, for CLIP-T, from a small JSON file."""

from __future__ import annotations

import json
from pathlib import Path

from kstory.core.errors import KstoryError

_FIX = 'write {"frame_1.png": "prompt", ...} or [{"file": "frame_1.png", "prompt": "..."}, ...]'


def load_prompts(path: Path) -> dict[str, str]:
    """A JSON object file name -> prompt, or a list of objects with ``file`` (or ``image``) and ``prompt``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise KstoryError(f"cannot read prompts: {exc}", path=path, fix=_FIX) from None
    if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
        return data
    if isinstance(data, list) and all(isinstance(d, dict) and isinstance(d.get("prompt"), str) for d in data):
        pairs = {str(d.get("file", d.get("image"))): d["prompt"] for d in data}
        if "None" not in pairs:
            return pairs
    raise KstoryError("prompts file has an unexpected shape", path=path, fix=_FIX)
