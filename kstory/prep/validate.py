"""Pre-checks that Data-Juicer cannot do safely, fused with the one decode every picture needs.

Data-Juicer loads pictures leniently (it sets ``LOAD_TRUNCATED_IMAGES``, so a
cut-off JPEG comes back grey-padded instead of failing) and decodes without a
pixel limit, so files are checked here first: outside the dataset, missing,
not a picture, truncated, too many pixels, pixel values without a known
white level, no caption, a name another sample already uses.  Captions are
normalised here too (:mod:`kstory.prep.captions`).

The decode done for the truncation check gives the pixels Data-Juicer's own
loader would, except that pictures with more than 8 bits per channel are
scaled instead of clamped (see :func:`decode_like_data_juicer`), and the file-only ops of
the recipe (shape, aspect ratio, file size, perceptual hash) take their
measurements from that decoded picture through Data-Juicer's context
mechanism.  The executor then finds those stats already computed and only
applies thresholds, so each picture is decoded once instead of once per op.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from kstory.prep.captions import normalise_caption
from kstory.prep.recipe import IMAGE_KEY, TEXT_KEY, Recipe
from kstory.prep.sources import Sample
from kstory.core.images import UnsupportedPixels, high_bit_source, strict_decoding, to_rgb8

# Ops whose stats depend on the picture file alone, so they can be measured before the caption mappers run.
PRE_MEASURED_OPS = {"image_shape_filter", "image_aspect_ratio_filter", "image_size_filter", "image_deduplicator"}
STAGE = "pre-check"
EXIF_ORIENTATION = 0x0112


@dataclass
class Check:
    """The outcome of the pre-checks for one sample; ``reason`` is None when it goes on to Data-Juicer.

    ``caption`` is the normalised caption that goes on to the recipe, and
    ``caption_cleaned`` what normalising it changed (empty when nothing).
    """

    sample: Sample
    caption: str | None = None
    caption_cleaned: list[str] = field(default_factory=list)
    reason: str | None = None
    detail: str = ""
    measured: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)
    duplicate_of: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    hashes: dict[str, Any] = field(default_factory=dict)


def measuring_ops(recipe: Recipe) -> list[Any]:
    """The recipe's ops whose measurements the pre-check takes, built straight from the recipe file.

    Parsing the whole Data-Juicer config would hand them the same arguments
    (their own plus the data keys kstory sets); building them without it
    lets the pre-check start before the parse.
    """
    from data_juicer.ops import load_ops

    entries = [
        {name: {**args, "text_key": TEXT_KEY, "image_key": IMAGE_KEY}}
        for name, args in recipe.ops
        if name in PRE_MEASURED_OPS
    ]
    return pre_measured_ops(load_ops(entries))


def pre_measured_ops(ops: Sequence[Any]) -> list[Any]:
    """The recipe ops whose measurements can be taken during the pre-check decode."""
    return [op for op in ops if op._name in PRE_MEASURED_OPS and not getattr(op, "consider_text", False)]


def check_samples(
    samples: Sequence[Sample], ops: Sequence[Any], *, max_pixels: int, num_proc: int = 1, show_progress: bool = True
) -> list[Check]:
    """Check every sample (in parallel when ``num_proc`` > 1) and keep the input order."""
    with checking_samples(samples, ops, max_pixels=max_pixels, num_proc=num_proc, show_progress=show_progress) as done:
        return done()


@contextlib.contextmanager
def checking_samples(
    samples: Sequence[Sample], ops: Sequence[Any], *, max_pixels: int, num_proc: int = 1, show_progress: bool = True
) -> Iterator[Callable[[], list[Check]]]:
    """Start checking in ``num_proc`` worker processes and yield the function that waits for the checks.

    The caller can do other work in between (prep parses the Data-Juicer
    config while the workers decode).  With one process the checks run when
    the function is called.
    """
    work = [(sample, max_pixels) for sample in samples]
    bar = dict(total=len(work), desc="checking pictures", unit="img", disable=not show_progress)

    def finished(results: Iterator[Check]) -> list[Check]:
        checks = list(tqdm(results, **bar))
        _drop_duplicate_names(checks)
        return checks

    if num_proc > 1 and len(work) > 1:
        # fork: the workers inherit the ops (and imagededup) instead of importing them again.  Nothing in
        # them may reconfigure OpenCV's threads: that waits forever in a child of a process that used them.
        with multiprocessing.get_context("fork").Pool(num_proc, initializer=_set_worker_ops, initargs=(ops,)) as pool:
            pending = pool.imap(_check_in_worker, work, chunksize=8)
            yield lambda: finished(pending)
    else:
        _set_worker_ops(ops)
        yield lambda: finished(_check_in_worker(item) for item in work)


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
    if sample.outside_dataset:
        return _drop(
            check,
            "path_outside_dataset",
            "not read: the path leads out of the dataset folder (../, absolute, or a symlink)",
            measured={"path": str(sample.path)},
        )
    if sample.caption is not None:
        check.caption, check.caption_cleaned = normalise_caption(sample.caption)
    if not sample.path.is_file():
        return _drop(check, "file_not_found", "the file does not exist", measured={"exists": False})
    if check.caption is None:
        return _drop(check, "missing_caption", "no caption was given for this picture", measured={"caption": None})
    if not check.caption.strip():
        detail = "the caption is empty" + (" once invisible characters are removed" if check.caption_cleaned else "")
        return _drop(check, "empty_caption", detail, measured={"caption_chars": len(check.caption)})
    size = sample.path.stat().st_size
    with strict_decoding(max_pixels=None):  # the pixel limit is checked below, from the header
        try:
            opened = Image.open(sample.path)
        except UnidentifiedImageError:
            return _drop(check, "not_an_image", "not a picture format Pillow can read", measured={"bytes": size})
        except Exception as error:  # Pillow's plugins raise many types on damaged headers
            return _drop(check, "corrupt_image", f"unreadable header: {error}", measured={"bytes": size})
        with opened:
            try:
                width, height, fmt = opened.width, opened.height, opened.format
                # only EXIF found while reading the header: Pillow decodes a PNG to look further
                orientation = opened.getexif().get(EXIF_ORIENTATION, 1) if "exif" in opened.info else 1
            except Exception as error:
                return _drop(check, "corrupt_image", f"unreadable header: {error}", measured={"bytes": size})
            check.measured = {"width": width, "height": height, "format": fmt, "bytes": size}
            if orientation != 1:
                check.measured["exif_orientation"] = orientation
            deep = high_bit_source(opened)  # only the header knows: Pillow reduces 16-bit RGB while decoding
            if deep is not None:
                check.measured["scaled_from"] = deep
            if width * height > max_pixels:
                return _drop(
                    check,
                    "too_many_pixels",
                    "not decoded: the header claims more pixels than allowed",
                    measured={**check.measured, "pixels": width * height},
                    threshold={"max_image_pixels": max_pixels},
                )
            try:
                image = decode_like_data_juicer(opened)
            except UnsupportedPixels as error:
                return _drop(check, "unsupported_pixel_values", f"not scaled to 8 bits: {error}")
            except Exception as error:  # truncated or damaged pixel data, whatever the plugin raises
                return _drop(check, "corrupt_image", f"decoding failed: {error}")
            check.stats, check.hashes = _measure(sample, check.caption, image, ops)
    return check


def decode_like_data_juicer(opened: Image.Image) -> Image.Image:
    """The pixels Data-Juicer's ``load_image`` gives for this file: decoded, EXIF orientation applied, RGB.

    Same steps as its loader (via ``datasets``' Image feature), on the file
    already open for the header checks, and without a copy when the picture
    is RGB already.  One deliberate difference: a picture with more than 8
    bits per channel is scaled to 8 bits by :func:`kstory.images.to_rgb8`
    (the rule the training cache uses too), where Data-Juicer's
    ``convert("RGB")`` clamps it to white.  Raises
    :class:`~kstory.images.UnsupportedPixels` for values without a known white level.
    """
    opened.load()
    if opened.getexif().get(EXIF_ORIENTATION) is not None:
        opened = ImageOps.exif_transpose(opened)
    return to_rgb8(opened)


def _measure(
    sample: Sample, caption: str, image: Image.Image, ops: Sequence[Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Let each op compute its stats (or hash) from the already-decoded picture, as a fused op would."""
    from data_juicer.ops.base_op import Filter
    from data_juicer.utils.constant import Fields

    key = str(sample.path)
    row = {"id": sample.id, TEXT_KEY: caption, IMAGE_KEY: [key], Fields.stats: {}, Fields.context: {key: image}}
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
    """The picture to hand the image deduplicator: grey and already area-averaged to its hasher's working size.

    imagededup's hashers shrink the RGB picture to ``target_size`` with
    Pillow's Lanczos filter and make it grey afterwards; on a 600 px picture
    that costs more than decoding it.  Here the picture is made grey first
    (the same ITU-R 601-2 luma) and shrunk with OpenCV's area averaging,
    about a seventh of the work.  The hasher then resizes a picture that
    already has its size (a plain copy) and hashes it as usual.  The hash can
    differ from plain Data-Juicer's in a bit or two; re-encoded and resized
    copies are found at least as often (bench/bench_dedup_hash.py).
    """
    target = getattr(getattr(op, "hasher", None), "target_size", None)
    if not (isinstance(target, tuple) and len(target) == 2):
        return image
    return Image.fromarray(grey_thumbnail(image, target))


def grey_thumbnail(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """``image`` in grey, area-averaged to ``size`` (width, height): the deduplicator's hash input."""
    import cv2

    return cv2.resize(np.asarray(image.convert("L")), size, interpolation=cv2.INTER_AREA)


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
