"""Cost of the base-model fingerprint (kstory.hashing.sampled_digest) on one large weights file.

Writes a real safetensors-shaped file of ``--size-gb`` (a valid header, then
random bytes over the whole file), times the sampled fingerprint with the
file's pages evicted from the page cache (cold-ish: posix_fadvise DONTNEED,
no root needed) and again warm, then the baseline, a full sha256 of every
byte. The file is deleted at the end.

    .venv/bin/python bench/bench_fingerprint.py --size-gb 17 --dir /tmp
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time
from pathlib import Path

from kstory.core.hashing import sampled_digest, sha256_file

CHUNK = 64 << 20


def write_weights_file(path: Path, size: int) -> None:
    """A safetensors header for one uint8 tensor filling the file, then random bytes."""
    header_bytes = 128  # room for any size's header, padded with spaces as the format allows
    body = size - 8 - header_bytes
    header = json.dumps({"weight": {"dtype": "U8", "shape": [body], "data_offsets": [0, body]}}).encode()
    header = header.ljust(header_bytes)
    block = os.urandom(CHUNK)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        left = body
        while left > 0:
            handle.write(block[: min(left, CHUNK)])
            left -= CHUNK


def evict(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def timed(function, path: Path) -> float:
    started = time.perf_counter()
    function(path)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=17.0, help="file size in GB (default 17, a Kolors UNet in fp32 is ~10)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the file (needs that much free disk)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the full sha256")
    args = parser.parse_args()
    size = int(args.size_gb * 1e9)
    path = Path(args.dir) / "kstory-bench-unet.safetensors"
    try:
        started = time.perf_counter()
        write_weights_file(path, size)
        evict(path)
        print(f"wrote {size / 1e9:.1f} GB in {time.perf_counter() - started:.1f} s")
        rows = [("sampled fingerprint, cold (pages evicted)", timed(sampled_digest, path)),
                ("sampled fingerprint, warm", timed(sampled_digest, path))]
        if not args.no_baseline:
            evict(path)
            rows.append(("baseline: full sha256, cold", timed(sha256_file, path)))
        print("| what | seconds |\n| --- | --- |")
        for what, seconds in rows:
            print(f"| {what} | {seconds:.4f} |")
    finally:
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
