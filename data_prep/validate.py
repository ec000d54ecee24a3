"""Pre-checks that Data-Juicer cannot do safely, fused with the one decode every picture needs.

Data-Juicer loads pictures leniently (it sets ``LOAD_TRUNCATED_IMAGES``, so a
cut-off JPEG comes back grey-padded instead of failing) and decodes without a
pixel limit, so files are checked here first: missing, not a picture,
truncated, too many pixels, no caption, a name another sample already uses.

The decode done for the truncation check uses Data-Juicer's own loader, and
the file-only ops of the recipe (shape, aspect ratio, file size, perceptual hash) take
their measurements from that decoded picture through Data-Juicer's context
mechanism.  The executor then finds those stats already computed and only
applies thresholds, so each picture is decoded once instead of once per op.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data_prep.recipe import IMAGE_KEY, TEXT_KEY
from data_prep.sources import Sample
from kstory.images import strict_decoding

# Ops whose stats depend on the picture file alone, so they can be measured before the caption mappers run.
PRE_MEASURED_OPS = {"image_shape_filter", "image_aspect_ratio_filter", "image_size_filter", "image_deduplicator"}
STAGE = "pre-check"
EXIF_ORIENTATION = 0x0112


@dataclass
class Check:
    """The outcome of the pre-checks for one sample; ``reason`` is None when it goes on to Data-Juicer."""

    sample: Sample
    reason: str | None = None
    detail: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)
    duplicate_of: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, Any] = field(default_factory=dict)


def pre_measured_ops(ops: Sequence[Any]) -> list[Any]:
    """The recipe ops whose measurements can be taken during the pre-check decode."""
    return [op for op in ops if op._name in PRE_MEASURED_OPS and not getattr(op, "consider_text", False)]


def check_samples(
    samples: Sequence[Sample], ops: Sequence[Any], *, max_pixels: int, num_proc: int = 1, show_progress: bool = True
) -> list[Check]:
    """Check every sample (in parallel when ``num_proc`` > 1) and keep the input order."""
    work = [(sample, max_pixels) for sample in samples]
    bar = dict(total=len(work), desc="checking pictures", unit="img", disable=not show_progress)
    if num_proc > 1 and len(work) > 1:
        with multiprocessing.get_context("fork").Pool(num_proc, initializer=_set_worker_ops, initargs=(ops,)) as pool:
            checks = list(tqdm(pool.imap(_check_in_worker, work, chunksize=8), **bar))
    else:
        _set_worker_ops(ops)
        checks = [_check_in_worker(item) for item in tqdm(work, **bar)]
    _drop_duplicate_names(checks)
    return checks


_WORKER_OPS: Sequence[Any] = ()


def _set_worker_ops(ops: Sequence[Any]) -> None:
    global _WORKER_OPS
    _WORKER_OPS = ops


def _check_in_worker(item: tuple[Sample, int]) -> Check:
    sample, max_pixels = item
    return check_sample(sample, _WORKER_OPS, max_pixels=max_pixels)


def check_sample(sample: Sample, ops: Sequence[Any], *, max_pixels: int) -> Check:
    """Run the pre-checks on one sample and, if it passes, take the ``ops``' measurements."""
    check = Check(sample)
    if not sample.path.is_file():
        return _drop(check, "file_not_found", "the file does not exist", measured={"exists": False})
    if sample.caption is None:
        return _drop(check, "missing_caption", "no caption was given for this picture", measured={"caption": None})
    if not sample.caption.strip():
        return _drop(check, "empty_caption", "the caption is empty", measured={"caption_chars": len(sample.caption)})
    size = sample.path.stat().st_size
    with strict_decoding(max_pixels=None):  # the pixel limit is checked above, from the header
        try:
            with Image.open(sample.path) as header:
                width, height, fmt = header.width, header.height, header.format
                # only EXIF found while reading the header: Pillow decodes a PNG to look further
                orientation = header.getexif().get(EXIF_ORIENTATION, 1) if "exif" in header.info else 1
        except UnidentifiedImageError:
            return _drop(check, "not_an_image", "not a picture format Pillow can read", measured={"bytes": size})
        except Exception as error:  # Pillow's plugins raise many types on damaged headers
            return _drop(check, "corrupt_image", f"unreadable header: {error}", measured={"bytes": size})
        check.measured = {"width": width, "height": height, "format": fmt, "bytes": size}
        if orientation != 1:
            check.measured["exif_orientation"] = orientation
        if width * height > max_pixels:
            return _drop(
                check,
                "too_many_pixels",
                "not decoded: the header claims more pixels than allowed",
                measured={**check.measured, "pixels": width * height},
                threshold={"max_image_pixels": max_pixels},
            )
        from data_juicer.utils.mm_utils import load_image

        try:
            image = load_image(str(sample.path))
        except Exception as error:  # truncated or damaged pixel data, whatever the plugin raises
            return _drop(check, "corrupt_image", f"decoding failed: {error}")
    check.stats, check.hashes = _measure(sample, image, ops)
    return check


def _measure(sample: Sample, image: Image.Image, ops: Sequence[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Let each op compute its stats (or hash) from the already-decoded picture, as a fused op would."""
    from data_juicer.ops.base_op import Filter
    from data_juicer.utils.constant import Fields

    key = str(sample.path)
    row = {"id": sample.id, TEXT_KEY: sample.caption, IMAGE_KEY: [key], Fields.stats: {}, Fields.context: {key: image}}
    for op in ops:
        if isinstance(op, Filter):
            batch = op.compute_stats_batched({name: [value] for name, value in row.items()}, context=True)
            row[Fields.stats] = batch[Fields.stats][0]
        else:
            row[Fields.context] = {key: _hash_input(op, image)}
            row = op.compute_hash(row, context=True)
            row[Fields.context] = {key: image}
    stats = row.pop(Fields.stats)
    hashes = {name: value for name, value in row.items() if name not in ("id", TEXT_KEY, IMAGE_KEY, Fields.context)}
    return stats, hashes


def _hash_input(op: Any, image: Image.Image) -> Image.Image:
    """The picture to hand the image deduplicator: already shrunk to its hasher's working size when that is exact.

    imagededup's hashers resize the picture (converted to an array and back)
    to ``target_size`` with Lanczos before anything else; Pillow's resize of
    a picture to the size it already has is a plain copy.  Doing that first
    resize here on the decoded RGB picture gives the very same hash while
    the hasher then copies a 32 x 32 picture instead of the full-size one
    twice.
    """
    target = getattr(getattr(op, "hasher", None), "target_size", None)
    if image.mode != "RGB" or not (isinstance(target, tuple) and len(target) == 2):
        return image
    return image.resize(target, Image.LANCZOS)


def _drop(
    check: Check,
    reason: str,
    detail: str,
    *,
    measured: dict[str, Any] | None = None,
    threshold: dict[str, Any] | None = None,
) -> Check:
    check.reason, check.detail = reason, detail
    check.measured = measured if measured is not None else check.measured
    check.threshold = threshold or {}
    return check


def _drop_duplicate_names(checks: list[Check]) -> None:
    """Two samples whose file stems match (case-insensitively) would collide in the flat training folder."""
    first: dict[str, str] = {}
    for check in checks:
        if check.reason is not None:
            continue
        stem = check.sample.path.stem.casefold()
        if stem in first:
            check.stats, check.hashes = {}, {}
            _drop(check, "duplicate_name", f"another sample ({first[stem]}) has the same file name")
            check.duplicate_of = first[stem]
        else:
            first[stem] = check.sample.id
