"""The scorers a ``scores.json`` was made with, so a re-score uses the same ones and never guesses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError


def _model_spec(info: dict[str, Any]) -> str:
    return "tiny" if info.get("random_weights") else str(info["identity"])


def recorded_models(scores: dict[str, Any], path: Path) -> tuple[str, str | None]:
    """(aesthetic model, CLIP model or None) as ``score_images`` takes them, read from a scores.json.

    A scores.json that does not record its aesthetic model is refused: scoring with anything else
    (the tiny random scorer least of all) would overwrite real scores with meaningless ones.
    """
    models = (scores.get("summary") or {}).get("models") or {}
    aesthetic = models.get("aesthetic") or {}
    if not aesthetic.get("identity"):
        raise KstoryError("scores.json does not record which aesthetic model made it", path=path,
                          fix="score the story once with `kstory score` and the model you want "
                              "(e.g. --aesthetic-model kolors-challenge)")
    clip = models.get("clip")
    return _model_spec(aesthetic), (_model_spec(clip) if clip and clip.get("identity") else None)
