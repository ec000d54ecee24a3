"""The pre-check's one decode and its dedup hash, against Data-Juicer's own loader and op (real library)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from kstory.prep.sources import Sample
from kstory.prep.synthetic import make_style_dataset
from kstory.prep.validate import check_sample, decode_like_data_juicer

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
    """The same pixels as Data-Juicer's loader, except for 16-bit grey, which its loader clamps to white."""
    from data_juicer.utils.mm_utils import load_image

    for path in _files(tmp_path):
        with Image.open(path) as opened:
            ours = decode_like_data_juicer(opened)
            theirs = load_image(str(path))
            assert ours.mode == theirs.mode == "RGB", path.name
            assert ours.size == theirs.size, path.name
            if path.name == "deep.png":  # written as grey * 257: scaling gives the grey back exactly
                grey = np.asarray(_gradient((96, 64)).convert("L"))
                assert np.array_equal(np.asarray(ours), np.repeat(grey[:, :, None], 3, axis=2))
                assert np.asarray(theirs).min() == 255  # what kstory no longer does
            else:
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

    from kstory.prep.validate import check_samples, measuring_ops
    from kstory.prep.recipe import load_recipe
    from kstory.prep.sources import scan_folder

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


def _deep_files(folder: Path) -> dict[str, tuple[Path, np.ndarray]]:
    """16-bit and wider pictures written by Pillow and OpenCV, with the 8-bit pixels the decode rule promises."""
    import cv2

    rng = np.random.default_rng(4)
    grey16 = rng.integers(0, 65536, (40, 56), dtype=np.uint16)
    grey16[0, :6] = [0, 128, 129, 25700, 65407, 65535]  # round(v / 257): 0, 0, 1, 100, 254, 255
    rounded = np.rint(grey16 / 257).astype(np.uint8)
    rgb16 = rng.integers(0, 65536, (40, 56, 3), dtype=np.uint16)
    rgba16 = rng.integers(0, 65536, (40, 56, 4), dtype=np.uint16)
    small = rng.integers(0, 256, (40, 56)).astype(np.int32)
    floats = rng.random((40, 56), dtype=np.float32)
    floats[0, :3] = [0.0, 0.5, 1.0]
    files = {
        "grey16.png": (lambda p: Image.fromarray(grey16).save(p), rounded),
        "grey16b.tif": (lambda p: Image.fromarray(grey16.astype(">u2")).save(p), rounded),
        "int16range.tif": (lambda p: Image.fromarray(grey16.astype(np.int32)).save(p), rounded),
        "int8range.tif": (lambda p: Image.fromarray(small).save(p), small.astype(np.uint8)),
        "float01.tif": (lambda p: Image.fromarray(floats).save(p), np.rint(floats * 255.0).astype(np.uint8)),
        "float255.tif": (lambda p: Image.fromarray(floats * 200).save(p), np.rint(floats * 200).astype(np.uint8)),
        "rgb16.png": (lambda p: cv2.imwrite(str(p), rgb16[:, :, ::-1]), (rgb16 >> 8).astype(np.uint8)),
        "rgba16.png": (
            lambda p: cv2.imwrite(str(p), rgba16[:, :, [2, 1, 0, 3]]),
            (rgba16[:, :, :3] >> 8).astype(np.uint8),
        ),
    }
    made = {}
    for name, (write, expected) in files.items():
        write(folder / name)
        made[name] = (folder / name, expected if expected.ndim == 3 else np.repeat(expected[:, :, None], 3, axis=2))
    return made


def test_deep_pictures_are_scaled_to_8_bits_not_clamped(tmp_path: Path) -> None:
    modes = {}
    for name, (path, expected) in _deep_files(tmp_path).items():
        with Image.open(path) as opened:
            modes[name] = opened.mode
            check = check_sample(Sample(name, path, "a caption"), [], max_pixels=10**8)
            assert check.reason is None, (name, check.detail)
            decoded = decode_like_data_juicer(opened)
        assert decoded.mode == "RGB", name
        assert np.array_equal(np.asarray(decoded), expected), name
    # what Pillow makes of them: 16-bit RGB(A) PNGs have no 16-bit mode and arrive as 8-bit already
    assert modes == {
        "grey16.png": "I;16", "grey16b.tif": "I;16B", "int16range.tif": "I", "int8range.tif": "I",
        "float01.tif": "F", "float255.tif": "F", "rgb16.png": "RGB", "rgba16.png": "RGBA",
    }


def test_the_report_names_the_deep_source_format(tmp_path: Path) -> None:
    made = _deep_files(tmp_path)
    scaled = {
        name: check_sample(Sample(name, path, "a caption"), [], max_pixels=10**8).measured.get("scaled_from")
        for name, (path, _) in made.items()
    }
    assert scaled == {
        "grey16.png": "I;16", "grey16b.tif": "I;16B", "int16range.tif": "I", "int8range.tif": "I",
        "float01.tif": "F", "float255.tif": "F", "rgb16.png": "RGB;16B", "rgba16.png": "RGBA;16B",
    }
    plain = tmp_path / "plain.png"
    _gradient((32, 32)).save(plain)
    assert "scaled_from" not in check_sample(Sample("plain.png", plain, "a caption"), [], max_pixels=10**8).measured


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (np.array([[-5, 300]], dtype=np.int32), "values -5..300"),
        (np.array([[0, 70000]], dtype=np.int32), "values 0..70000"),
        (np.array([[0.0, 300.0]], dtype=np.float32), "values 0..300"),
        (np.array([[0.0, np.nan]], dtype=np.float32), "NaN"),
    ],
)
def test_values_without_a_white_level_are_refused(tmp_path: Path, values: np.ndarray, message: str) -> None:
    path = tmp_path / "odd.tif"
    Image.fromarray(values).save(path)
    check = check_sample(Sample("odd.tif", path, "a caption"), [], max_pixels=10**8)
    assert check.reason == "unsupported_pixel_values"
    assert message in check.detail and check.detail.startswith("not scaled to 8 bits")


def test_deep_pictures_get_their_own_dedup_hash(tmp_path: Path) -> None:
    """Clamped to white, every 16-bit picture had the same hash; scaled, each has its 8-bit twin's."""
    from data_juicer.ops import load_ops
    from data_juicer.utils.constant import HashKeys

    op = load_ops([{"image_deduplicator": {"method": "phash"}}])[0]
    folder = make_style_dataset(tmp_path / "set", 3, seed=5, defects=False)
    hashes = {}
    for original in sorted(folder.glob("sample_*")):
        with Image.open(original) as image:
            grey = np.asarray(image.convert("L"))
        deep = tmp_path / f"deep_{original.stem}.png"
        Image.fromarray(grey.astype(np.uint16) * 257).save(deep)
        eight = tmp_path / f"eight_{original.stem}.png"
        Image.fromarray(grey).save(eight)
        pair = [
            check_sample(Sample(p.name, p, "a caption"), [op], max_pixels=10**8).hashes[HashKeys.imagehash]
            for p in (deep, eight)
        ]
        assert pair[0] == pair[1], original.name
        hashes[original.name] = pair[0]
    assert len(set(hashes.values())) == len(hashes)
