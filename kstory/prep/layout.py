"""Write the kept samples in DiffSynth-Studio's training layout and swap the finished output into place.

DiffSynth reads ``train/metadata.csv`` (``file_name,text``) with the pictures
beside it.  Everything is built in a hidden staging folder next to ``out`` and
only renamed into place once complete, so ``out`` always holds one whole run.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

from kstory.core.atomic import write_text
from kstory.core.errors import KstoryError
from kstory.core.images import HIGH_BIT_MODES, to_rgb8

TRAIN_DIR = "train"
REPORT_NAME = "report.json"
# Formats every trainer's Pillow reads as-is; anything else (GIF, TIFF, BMP...) is re-encoded to PNG.
PASS_THROUGH_FORMATS = {"JPEG", "PNG", "WEBP"}
COPY_THREADS = 8


@dataclass(frozen=True)
class Picture:
    """A picture that passed the pre-checks: where it comes from and whether it must be re-encoded."""

    id: str
    source: Path
    reencode: bool


def needs_reencode(file_format: str | None, exif_orientation: int, scaled_from: str | None = None) -> bool:
    """Whether the picture must be re-encoded instead of copied byte for byte.

    Unusual formats; pictures whose EXIF says to rotate them (Data-Juicer
    measured them rotated); and pictures that decode in a mode deeper than
    8 bits, which another trainer's ``convert("RGB")`` would clamp to white
    (a 16-bit RGB PNG stays as it is: Pillow reads it as 8-bit RGB itself).
    """
    return file_format not in PASS_THROUGH_FORMATS or exif_orientation != 1 or scaled_from in HIGH_BIT_MODES


def with_trigger(caption: str, trigger_word: str | None) -> str:
    """Prefix ``"<trigger>, "`` unless the caption already contains the trigger as a whole word."""
    if not trigger_word or re.search(rf"(?<!\w){re.escape(trigger_word)}(?!\w)", caption, flags=re.IGNORECASE):
        return caption
    return f"{trigger_word}, {caption}"


class TrainingSetWriter:
    """Copies pictures into ``staging/train`` in background threads, then writes metadata.csv for the kept ones.

    The copies start before Data-Juicer runs, so they overlap its work (which
    uses one core) instead of following it; the few pictures Data-Juicer then
    drops are deleted again.  Use it as a context manager: leaving without
    :meth:`finish` (no sample kept, or an error) removes ``staging/train``.
    """

    def __init__(self, pictures: Sequence[Picture], staging: Path) -> None:
        self.train = staging / TRAIN_DIR
        self.train.mkdir(parents=True, exist_ok=True)
        # threads overlap the file system waits (copyfile copies in the kernel, without the GIL)
        self._pool = ThreadPoolExecutor(max_workers=COPY_THREADS, thread_name_prefix="kstory-copy")
        self._placed = {picture.id: self._pool.submit(_place, picture, self.train) for picture in pictures}
        self._finished = False

    def __enter__(self) -> TrainingSetWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if not self._finished:
            shutil.rmtree(self.train, ignore_errors=True)

    def finish(self, kept: Sequence[tuple[str, str]], *, show_progress: bool = True) -> dict[str, str]:
        """Keep the pictures of ``kept`` ((sample id, final caption), in training order); delete the others.

        Returns sample id -> path of its picture relative to the staging folder.
        """
        rows = io.StringIO()
        writer = csv.writer(rows, lineterminator="\n")
        writer.writerow(["file_name", "text"])
        written: dict[str, str] = {}
        bar = tqdm(kept, desc="writing training set", unit="img", disable=not show_progress)
        for sample_id, caption in bar:
            name = self._placed[sample_id].result()
            writer.writerow([name, caption])
            written[sample_id] = f"{TRAIN_DIR}/{name}"
        for sample_id in self._placed.keys() - written.keys():
            placed = self._placed[sample_id]
            if placed.exception() is None:  # a dropped picture that could not be copied needs no cleaning up
                (self.train / placed.result()).unlink()
        write_text(self.train / "metadata.csv", rows.getvalue())
        self._finished = True
        return written


def _place(picture: Picture, train: Path) -> str:
    """Copy the picture byte for byte, or re-encode it to an upright 8-bit PNG when needed; returns its file name.

    Plain writes: ``train`` lies in the staging folder, which is published
    as a whole (see :func:`publish`), so a file cut short by an interrupted
    run is never seen and a per-file atomic write would only add a temporary
    file, an fsync and a rename per picture.  Names are the original file
    names, unique because the pre-checks drop stem clashes.
    """
    if not picture.reencode:
        shutil.copyfile(picture.source, train / picture.source.name)
        return picture.source.name
    name = f"{picture.source.stem}.png"
    with Image.open(picture.source) as image:
        to_rgb8(ImageOps.exif_transpose(image)).save(train / name, format="PNG")
    return name


def check_out(out: Path, *, overwrite: bool) -> None:
    """Refuse an ``out`` that holds something we must not replace."""
    if out.exists() and not out.is_dir():
        raise KstoryError("output path is a file", path=out, fix="pass a folder path for the output")
    if not out.exists() or not any(out.iterdir()):
        return
    if not (out / REPORT_NAME).is_file():
        raise KstoryError(
            "output folder is not empty and does not hold a previous prep run; refusing to replace it",
            path=out,
            fix="choose a new or empty output folder",
        )
    if not overwrite:
        raise KstoryError(
            "output folder already holds a previous prep run",
            path=out,
            fix="pass --overwrite to replace it, or choose another output folder",
        )


def make_staging(out: Path) -> Path:
    """A hidden sibling of ``out`` (same filesystem, so the final rename is atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; the published folder should not be
    return staging


def publish(staging: Path, out: Path) -> None:
    """Swap ``staging`` in as ``out``; an old ``out`` is moved aside first and deleted only after the swap."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    try:
        os.replace(staging, out)
    except BaseException:
        if old is not None:
            os.replace(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
