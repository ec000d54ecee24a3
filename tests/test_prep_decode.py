"""The pre-check's one decode and its dedup hash, against Data-Juicer's own loader and op (real library)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from data_prep.sources import Sample
from data_prep.synthetic import make_style_dataset
from data_prep.validate import check_sample, decode_like_data_juicer

EXIF_ORIENTATION = 0x0112


def _gradient(size: tuple[int, int]) -> Image.Image:
    x = np.linspace(0, 255, size[0], dtype=np.uint8)[None, :].repeat(size[1], 0)
    y = np.linspace(0, 255, size[1], dtype=np.uint8)[:, None].repeat(size[0], 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1), "RGB")


def _files(folder: Path) -> list[Path]:
    """Pictures in the modes and with the metadata a scraped set holds."""
    base = _gradient((96, 64))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to show
    made = {
        "rotated.jpg": lambda p: base.save(p, "JPEG", exif=exif.tobytes()),
        "palette.png": lambda p: base.convert("P", palette=Image.ADAPTIVE).save(p),
        "alpha.png": lambda p: base.convert("RGBA").save(p),
        "grey.jpg": lambda p: base.convert("L").save(p, "JPEG"),
        "cmyk.jpg": lambda p: base.convert("CMYK").save(p, "JPEG"),
        "deep.png": lambda p: Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257)).save(p),
        "plain.webp": lambda p: base.save(p, "WEBP", quality=90),
    }
    for name, save in made.items():
        save(folder / name)
    return [folder / name for name in made]


def test_decode_gives_data_juicers_pixels(tmp_path: Path) -> None:
    from data_juicer.utils.mm_utils import load_image

    for path in _files(tmp_path):
        with Image.open(path) as opened:
            ours = decode_like_data_juicer(opened)
            theirs = load_image(str(path))
            assert ours.mode == theirs.mode == "RGB", path.name
            assert ours.size == theirs.size, path.name
            assert np.array_equal(np.asarray(ours), np.asarray(theirs)), path.name
    with Image.open(tmp_path / "rotated.jpg") as opened:
        assert decode_like_data_juicer(opened).size == (64, 96)  # measured upright, as Data-Juicer does


def _copies(picture: Image.Image) -> dict[str, bytes]:
    def encoded(image: Image.Image, file_format: str, **options) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, file_format, **options)
        return buffer.getvalue()

    smaller = picture.resize((picture.width * 4 // 5, picture.height * 4 // 5), Image.BILINEAR)
    return {
        "png": encoded(picture, "PNG"),
        "jpeg90": encoded(picture, "JPEG", quality=90),
        "half": encoded(picture.resize((picture.width // 2, picture.height // 2), Image.BICUBIC), "PNG"),
        "smaller_jpeg": encoded(smaller, "JPEG", quality=80),
    }


@pytest.mark.parametrize("method", ["phash", "dhash"])
def test_dedup_hash_finds_copies_at_least_as_often_as_data_juicers(tmp_path: Path, method: str) -> None:
    """kstory hashes a grey, area-averaged thumbnail; the op itself Lanczos-shrinks the RGB picture."""
    from data_juicer.ops import load_ops
    from data_juicer.utils.constant import HashKeys

    op = load_ops([{"image_deduplicator": {"method": method}}])[0]
    folder = make_style_dataset(tmp_path / "set", 12, seed=5, defects=False)
    originals = sorted(folder.glob("sample_*"))

    def ours(path: Path) -> str:
        check = check_sample(Sample(path.name, path, "a caption"), [op], max_pixels=10**8)
        assert check.reason is None
        return check.hashes[HashKeys.imagehash]

    def theirs(path: Path) -> str:
        return op.compute_hash({"text": "a caption", "images": [str(path)]})[HashKeys.imagehash]

    found = {"kstory": 0, "data-juicer": 0}
    hashes = {"kstory": set(), "data-juicer": set()}
    for index, original in enumerate(originals):
        with Image.open(original) as image:
            copies = _copies(image.convert("RGB"))
        for kind, data in copies.items():
            copy = tmp_path / f"copy_{index}_{kind}.{'jpg' if 'jpeg' in kind else 'png'}"
            copy.write_bytes(data)
            for name, hash_of in (("kstory", ours), ("data-juicer", theirs)):
                same = hash_of(copy) == hash_of(original)
                found[name] += same
                if kind == "png":  # the very same pixels: always found
                    assert same, (name, copy.name)
        for name, hash_of in (("kstory", ours), ("data-juicer", theirs)):
            hashes[name].add(hash_of(original))
    assert found["kstory"] >= found["data-juicer"], found
    assert found["kstory"] >= 0.75 * len(originals) * 4, found
    assert len(hashes["kstory"]) == len(originals)  # different pictures are never merged


@pytest.mark.timeout(120)
def test_parallel_pre_check_after_opencv_used_its_threads(tmp_path: Path) -> None:
    """Forked workers must not wait on OpenCV threads that only exist in this process."""
    import cv2

    from data_prep.validate import check_samples, measuring_ops
    from data_prep.recipe import load_recipe
    from data_prep.sources import scan_folder

    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    try:
        cv2.GaussianBlur(np.zeros((2048, 2048), np.uint8), (5, 5), 0)  # starts OpenCV's thread pool here
        folder = make_style_dataset(tmp_path / "set", 4, seed=3, defects=False)
        checks = check_samples(
            scan_folder(folder).samples, measuring_ops(load_recipe()), max_pixels=10**8, num_proc=2, show_progress=False
        )
        assert [check.reason for check in checks] == [None] * 4
        assert all(check.hashes for check in checks)
    finally:
        cv2.setNumThreads(threads)
