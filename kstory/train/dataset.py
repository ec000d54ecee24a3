"""Read the prep stage's output (DiffSynth's layout: ``train/metadata.csv`` + images) and check it up front."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kstory.core.errors import KstoryError

METADATA = "metadata.csv"
COLUMNS = ("file_name", "text")
_FIX = "run 'kstory prep' first, or point at a folder whose train/metadata.csv has columns file_name,text"


@dataclass(frozen=True)
class Sample:
    """One training pair: an image file and its caption (trigger word already applied)."""

    image: Path
    text: str


def metadata_path(data_dir: Path) -> Path:
    """``DATA/train/metadata.csv``; a folder that directly holds metadata.csv is accepted too."""
    data_dir = Path(data_dir)
    for candidate in (data_dir / "train" / METADATA, data_dir / METADATA):
        if candidate.is_file():
            return candidate
    return data_dir / "train" / METADATA


def read_samples(data_dir: Path, trigger_word: str | None = None) -> list[Sample]:
    """The dataset's samples in file order; KstoryError naming metadata.csv when it is missing or unusable."""
    path = metadata_path(data_dir)
    if not path.is_file():
        raise KstoryError("training data not found: no metadata.csv", path=path, fix=_FIX)
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            missing = [c for c in COLUMNS if c not in header]
            if missing:
                raise KstoryError(
                    f"metadata.csv lacks column(s) {', '.join(missing)} (has: {', '.join(header) or 'nothing'})",
                    path=path, fix=_FIX,
                )
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as error:
        raise KstoryError(f"metadata.csv is not readable CSV: {error}", path=path, fix=_FIX) from error
    samples = []
    for line, row in enumerate(rows, start=2):
        name, text = (row.get("file_name") or "").strip(), (row.get("text") or "").strip()
        if not name:
            raise KstoryError(f"metadata.csv line {line} has no file_name", path=path, fix=_FIX)
        image = path.parent / name
        if not image.is_file():
            raise KstoryError(f"image listed in metadata.csv line {line} is missing", path=image, fix=_FIX)
        samples.append(Sample(image, apply_trigger(text, trigger_word)))
    if not samples:
        raise KstoryError("metadata.csv lists no images: nothing to train on", path=path, fix=_FIX)
    return samples


def apply_trigger(text: str, trigger_word: str | None) -> str:
    """Put the trigger word in front of a caption that lacks it (prep normally did this already)."""
    if not trigger_word or trigger_word in text:
        return text
    return f"{trigger_word}, {text}" if text else trigger_word
