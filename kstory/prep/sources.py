"""Turn what the user points at into a list of samples (image file + caption), without judging them.

Accepted inputs: a local folder with ``metadata.csv`` / ``metadata.jsonl`` or
sidecar ``.txt`` captions, or a ModelScope dataset id (``modelscope://owner/name``)
that is exported to a local folder first.  Problems with single samples are
left for validation to record; only problems that make the whole input
unreadable raise :class:`KstoryError`.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.images import HIGH_BIT_MODES

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
METADATA_FILES = ("metadata.csv", "metadata.jsonl")
IMAGE_COLUMNS = ("file_name", "image")
CAPTION_COLUMNS = ("text", "caption")
MODELSCOPE_SCHEMES = ("modelscope", "ms")


@dataclass(frozen=True)
class Sample:
    """One input sample; ``caption`` is None when no caption was given at all.

    ``outside_dataset`` is set when the path (or its caption file) leads out
    of the dataset folder: written as ``../x`` or absolute, or through a
    symlink.  Such a sample is dropped without being read.
    """

    id: str
    path: Path
    caption: str | None
    outside_dataset: bool = False


@dataclass
class Scan:
    """Samples found in a folder, in input order, plus files that are not samples."""

    folder: Path
    captions_from: str
    samples: list[Sample] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def is_modelscope_id(source: str | Path) -> bool:
    """True for ``modelscope://owner/name`` or ``ms://owner/name`` (optionally ``?subset=...&split=...``)."""
    return isinstance(source, str) and urlparse(source).scheme in MODELSCOPE_SCHEMES


def export_modelscope(source: str, dest: Path) -> Path:
    """Download a ModelScope image-caption dataset and write it as a metadata.csv folder in ``dest``.

    Needs network access to the ModelScope hub, so it is not exercised by the tests.
    """
    from modelscope.msdatasets import MsDataset

    url = urlparse(source)
    query = parse_qs(url.query)
    dataset_id = f"{url.netloc}{url.path}".strip("/")
    subset = query.get("subset", ["default"])[0]
    split = query.get("split", ["train"])[0]
    try:
        dataset = MsDataset.load(dataset_id, subset_name=subset, split=split)
    except Exception as error:  # network, auth, unknown id: all surface as assorted exception types
        raise KstoryError(
            f"cannot load ModelScope dataset {dataset_id!r} (subset {subset!r}, split {split!r}): {error}",
            fix="check the id and the network, or download the dataset and pass its folder",
        ) from error
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "metadata.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file_name", "text"])
        for index, row in enumerate(dataset):
            name = export_picture(row["image"], dest, index)
            caption = next((row[key] for key in ("text", "caption", "prompt") if row.get(key)), "")
            writer.writerow([name, caption])
    return dest


def export_picture(image: Image.Image, dest: Path, index: int) -> str:
    """Write one dataset picture as ``<index>.png``, or ``.tif`` when it is deeper than 8 bits; returns the name.

    A deep picture is written as it is (TIFF holds every deep Pillow mode),
    so the pre-check scales it by kstory's one rule, or refuses it, and
    reports either, instead of ``convert("RGB")`` clamping it to white here.
    """
    if image.mode in HIGH_BIT_MODES:
        name = f"{index:06d}.tif"
        image.save(dest / name, format="TIFF")
    else:
        name = f"{index:06d}.png"
        image.convert("RGB").save(dest / name, format="PNG")
    return name


def scan_folder(folder: Path) -> Scan:
    """List the samples of ``folder``: metadata.csv, else metadata.jsonl, else sidecar .txt captions."""
    folder = Path(folder)
    if not folder.is_dir():
        raise KstoryError("input folder does not exist", path=folder, fix="pass a folder of images with captions")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder)))
    for name in METADATA_FILES:
        if (folder / name).is_file():
            return _scan_metadata(folder, folder / name, files)
    return _scan_sidecars(folder, files)


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _scan_metadata(folder: Path, metadata: Path, files: list[Path]) -> Scan:
    rows = _read_csv(metadata) if metadata.suffix == ".csv" else _read_jsonl(metadata)
    scan = Scan(folder=folder, captions_from=metadata.name)
    listed = set()
    seen: dict[str, int] = {}
    root = os.path.realpath(folder)
    for file_name, caption in rows:
        path = folder / file_name
        listed.add(path)
        sample_id = Path(file_name).as_posix()
        seen[sample_id] = seen.get(sample_id, 0) + 1
        if seen[sample_id] > 1:  # listed again: keep ids unique, validation drops it as a duplicate name
            sample_id = f"{sample_id}#{seen[sample_id]}"
        outside = Path(file_name).is_absolute() or not _inside(root, path)
        scan.samples.append(Sample(id=sample_id, path=path, caption=caption, outside_dataset=outside))
    for path in files:
        if path in listed or path == metadata:
            continue
        relative = path.relative_to(folder).as_posix()
        if path.suffix.lower() in IMAGE_SUFFIXES:
            scan.samples.append(Sample(id=relative, path=path, caption=None, outside_dataset=not _inside(root, path)))
        else:
            scan.ignored.append(relative)
    return scan


def _inside(root: str, path: Path) -> bool:
    """Whether ``path``, with every symlink and ``..`` resolved, lies in the folder whose real path is ``root``.

    Only the path is resolved (no file is opened); a symlink loop resolves to
    a path that is not a file, which the pre-check reports as missing.
    """
    return os.path.commonpath([root, os.path.realpath(path)]) == root


def _read_csv(metadata: Path) -> list[tuple[str, str | None]]:
    """The (image, caption) rows; a syntax error stops with the line it starts on.

    ``strict`` makes Python's csv reader raise on a stray quote instead of
    reading on, and an unterminated quote then fails at the end of the file
    ("unexpected end of data") instead of swallowing the rest of it into one
    caption.  A quoted caption that is closed, but only after taking in lines
    that look like rows of their own, is refused too.
    """
    with open(metadata, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle, strict=True)
        rows: list[tuple[str, str | None]] = []
        names: list[str] | None = None
        line = 1  # where the next row starts
        try:
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields:  # a blank line
                    continue
                if names is None:
                    names = fields
                    image_col, caption_col = _columns(metadata, names)
                    if caption_col not in names:
                        raise KstoryError(
                            f"columns are {names}, none of which holds the caption",
                            path=metadata,
                            fix=f"add a caption column named one of {list(CAPTION_COLUMNS)}",
                        )
                    image_at, caption_at = names.index(image_col), names.index(caption_col)
                    continue
                if len(fields) != len(names):
                    raise _csv_error(
                        metadata,
                        start,
                        f"has {len(fields)} fields, the header {len(names)}",
                        "quote a caption that contains a comma, or remove the extra or missing field",
                    )
                _refuse_swallowed_rows(metadata, start, fields)
                if fields[image_at]:
                    rows.append((fields[image_at], fields[caption_at]))
        except csv.Error as error:
            end = reader.line_num
            if "end of data" in str(error):
                raise _csv_error(
                    metadata,
                    line,
                    f"a quoted field opened here is never closed (it runs to the end of the file, line {end})",
                    'close the quote, or write a quote inside a quoted caption as two quotes ("")',
                ) from None
            raise _csv_error(
                metadata,
                line,
                f"is not valid CSV ({error})",
                'quote the whole caption and write a quote inside it as two quotes ("")',
            ) from None
    if names is None:
        _columns(metadata, [])  # raises: no header at all
    return rows


def _refuse_swallowed_rows(metadata: Path, start: int, fields: list[str]) -> None:
    """A multi-line quoted field with a later line that starts like a row: a quote closed too late.

    "Starts like a row" means: text up to a comma that names a picture in the
    dataset folder, so a caption that merely spans lines is fine.
    """
    for field_text in fields:
        for offset, text in enumerate(field_text.split("\n")[1:], start=1):
            first = text.split(",", 1)[0].strip().strip('"')
            if "," in text and Path(first).suffix.lower() in IMAGE_SUFFIXES and _is_listed_picture(metadata, first):
                raise _csv_error(
                    metadata,
                    start,
                    f"a quoted field opened here takes in line {start + offset} ({first!r}...) as part of its text",
                    'close the quote on the line it opens, or write a quote inside a caption as two quotes ("")',
                )


def _is_listed_picture(metadata: Path, name: str) -> bool:
    path = metadata.parent / name
    return not Path(name).is_absolute() and _inside(os.path.realpath(metadata.parent), path) and path.is_file()


def _csv_error(metadata: Path, line: int, problem: str, fix: str) -> KstoryError:
    return KstoryError(f"line {line}: {problem}", path=metadata, fix=fix)


def _read_jsonl(metadata: Path) -> list[tuple[str, str | None]]:
    rows = []
    for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise KstoryError(
                f"line {number} is not valid JSON ({error.msg})", path=metadata, fix="fix or delete that line"
            ) from None
        image_col, caption_col = _columns(metadata, list(record), line=number)
        image = record[image_col]
        if isinstance(image, list) and len(image) == 1:
            image = image[0]
        if not isinstance(image, str):
            raise KstoryError(
                f"line {number}: {image_col!r} must be one relative file path",
                path=metadata,
                fix="use one image per line",
            )
        caption = record.get(caption_col)
        rows.append((image, caption if isinstance(caption, str) else None))
    return rows


def _columns(metadata: Path, names: list[str], line: int | None = None) -> tuple[str, str]:
    image_col = next((name for name in IMAGE_COLUMNS if name in names), None)
    caption_col = next((name for name in CAPTION_COLUMNS if name in names), CAPTION_COLUMNS[0])
    if image_col is None:
        where = f"line {line} has" if line else "columns are"
        raise KstoryError(
            f"{where} {names}, none of which names the image",
            path=metadata,
            fix=f"name the image column one of {list(IMAGE_COLUMNS)} and the caption one of {list(CAPTION_COLUMNS)}",
        )
    return image_col, caption_col


def _scan_sidecars(folder: Path, files: list[Path]) -> Scan:
    """Every image (and every other file with a same-stem .txt) is a sample; the .txt is its caption."""
    scan = Scan(folder=folder, captions_from="sidecar .txt files")
    root = os.path.realpath(folder)
    captions = {path.with_suffix(""): path for path in files if path.suffix.lower() == ".txt"}
    used: set[Path] = set()
    for path in files:
        if path.suffix.lower() == ".txt":
            continue
        sidecar = captions.get(path.with_suffix(""))
        if path.suffix.lower() not in IMAGE_SUFFIXES and sidecar is None:
            scan.ignored.append(path.relative_to(folder).as_posix())
            continue
        caption = None
        outside = not _inside(root, path) or (sidecar is not None and not _inside(root, sidecar))
        if sidecar is not None:
            used.add(sidecar)
            if not outside:
                caption = sidecar.read_text(encoding="utf-8", errors="replace")
        sample_id = path.relative_to(folder).as_posix()
        scan.samples.append(Sample(id=sample_id, path=path, caption=caption, outside_dataset=outside))
    scan.ignored += [path.relative_to(folder).as_posix() for path in captions.values() if path not in used]
    return scan
