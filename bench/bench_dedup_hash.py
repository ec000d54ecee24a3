"""Benchmark (not a test): kstory's near-duplicate hash against Data-Juicer's own `image_deduplicator` hash.

Data-Juicer's op hands the decoded RGB picture to imagededup, which shrinks
it to the hasher's size with Lanczos and makes it grey afterwards.  kstory's
pre-check makes the picture grey first and area-averages it (see
`data_prep.validate.grey_thumbnail`), then lets the same op and hasher hash
it.  This script generates clean pictures, makes copies a dataset really
contains (re-saved as PNG, re-encoded as JPEG, resized, both), and prints,
side by side:

- the cost of the hash per picture, on already decoded pictures (kstory
  decodes once for its integrity check, so decoding is not part of either);
- how often each way gives a copy the same hash as its original (the op
  drops a sample only on an equal hash, so this is the share of copies found);
- how many of the originals share a hash (different pictures merged).

    .venv/bin/python bench/bench_dedup_hash.py              # 400 pictures, 512-640 px
    .venv/bin/python bench/bench_dedup_hash.py --method dhash
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from PIL import Image


def _encoded(image: Image.Image, file_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, file_format, **options)
    return buffer.getvalue()


def _scaled(image: Image.Image, factor: float, resample: int) -> Image.Image:
    return image.resize((int(image.width * factor), int(image.height * factor)), resample)


# The copies a scraped dataset really holds: re-saved, re-encoded, resized, both.
COPIES: dict[str, Callable[[Image.Image], bytes]] = {
    "PNG re-save": lambda image: _encoded(image, "PNG"),
    "JPEG q90": lambda image: _encoded(image, "JPEG", quality=90),
    "JPEG q75": lambda image: _encoded(image, "JPEG", quality=75),
    "x0.5 bicubic": lambda image: _encoded(_scaled(image, 0.5, Image.BICUBIC), "PNG"),
    "x0.8 bilinear": lambda image: _encoded(_scaled(image, 0.8, Image.BILINEAR), "PNG"),
    "x0.8 + JPEG q80": lambda image: _encoded(_scaled(image, 0.8, Image.BILINEAR), "JPEG", quality=80),
    "x1.5 bicubic": lambda image: _encoded(_scaled(image, 1.5, Image.BICUBIC), "PNG"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=400, help="generated pictures (default 400)")
    parser.add_argument("--scale", type=float, default=1.0, help="picture size: 1.0 = 512-640 px, 2.0 = ~1024 px")
    parser.add_argument("--method", default="phash", choices=["phash", "dhash", "ahash", "whash"])
    args = parser.parse_args()

    from data_juicer.ops import load_ops
    from data_juicer.utils.constant import Fields, HashKeys

    from kstory.prep.synthetic import make_style_dataset
    from kstory.prep.validate import _measure
    from kstory.prep.sources import Sample

    op = load_ops([{"image_deduplicator": {"method": args.method}}])[0]
    folder = make_style_dataset(Path(tempfile.mkdtemp(prefix="bench_dedup.")) / "set", args.n, seed=2, defects=False,
                                scale=args.scale)
    originals = [Image.open(path).convert("RGB") for path in sorted(folder.glob("sample_*"))]

    def data_juicer_hash(image: Image.Image) -> str:
        row = {"text": "", "images": ["picture"], Fields.context: {"picture": image}}
        return op.compute_hash(row, context=True)[HashKeys.imagehash]

    def kstory_hash(image: Image.Image) -> str:
        sample = Sample(id="picture", path=Path("picture"), caption="")
        return _measure(sample, image, [op])[1][HashKeys.imagehash]

    ways = {"Data-Juicer op (RGB, Lanczos)": data_juicer_hash, "kstory (grey, area average)": kstory_hash}
    copies = {name: [_decoded(make(image)) for image in originals] for name, make in COPIES.items()}
    results = {}
    for way, hash_of in ways.items():
        hash_of(originals[0])  # warm-up
        started = time.perf_counter()
        hashes = [hash_of(image) for image in originals]
        milliseconds = (time.perf_counter() - started) / len(originals) * 1e3
        found = {name: sum(hash_of(c) == h for c, h in zip(pictures, hashes, strict=True)) / len(hashes)
                 for name, pictures in copies.items()}
        results[way] = (milliseconds, found, len(hashes) - len(set(hashes)))

    size = originals[0].size
    print(f"\n{len(originals)} generated pictures (~{size[0]} px), method {args.method}; share of copies found:")
    names = list(ways)
    print(f"{'':24}{names[0]:>32}{names[1]:>32}")
    for name in COPIES:
        print(f"{name:24}" + "".join(f"{results[way][1][name]:>32.3f}" for way in names))
    means = [sum(results[way][1].values()) / len(COPIES) for way in names]
    print(f"{'mean':24}" + "".join(f"{mean:>32.3f}" for mean in means))
    print(f"{'originals merged':24}" + "".join(f"{results[way][2]:>32d}" for way in names))
    cost = [results[way][0] for way in names]
    print(f"{'hash cost per picture':24}" + "".join(f"{ms:>29.2f} ms" for ms in cost))
    print(f"kstory's hash: {cost[0] / cost[1]:.1f}x faster, copies found {means[1]:.3f} vs {means[0]:.3f}")


def _decoded(data: bytes) -> Image.Image:
    from data_juicer.utils.mm_utils import load_image

    return load_image(data)


if __name__ == "__main__":
    main()
