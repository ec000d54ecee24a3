"""Time and peak memory of a story with the character reference (IP-Adapter) against the plain story.

Runs kstory's story stage twice on the tiny random-weight Kolors and the tiny
IP-Adapter (CPU, 8 frames), once with a reference image on every frame and
once without, and prints each run's seconds (denoising and decoding, the
``seconds``) and the whole call (loading, the image-encoder phase: ``wall``) and peak memory, with the ratio to the plain
story. Peak memory is the process's peak RSS growth on the CPU (a fresh
subprocess per run) and ``torch.cuda.max_memory_allocated`` on a GPU.

    python bench/bench_ip_adapter.py [--size 128] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

_RUN = r"""
import json, resource, sys, time
import torch
from kstory.story import generate_story
spec, out = sys.argv[1], sys.argv[2]
start_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
result = generate_story(spec, out, model="tiny")
wall = time.perf_counter() - started
peak = result.peak_vram_bytes if result.peak_vram_bytes is not None else \
    (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start_rss) * 1024
print(json.dumps({"seconds": result.seconds, "wall": wall, "peak": peak}))
"""


def _spec(folder: Path, size: int, steps: int, reference: bool) -> Path:
    from PIL import Image

    frames = [{"prompt": f"scene {i}", "seed": 100 + i} for i in range(1, 9)]
    character = {"description": "a fox"}
    if reference:
        Image.new("RGB", (size, size), (220, 110, 40)).save(folder / "fox.png")
        character["reference"] = {"image": "fox.png", "adapter": "tiny"}
    spec = {"title": "bench", "character": character, "frames": frames,
            "defaults": {"width": size, "height": size, "steps": steps}, "generation": {"batch_size": 4}}
    path = folder / ("with.yaml" if reference else "plain.yaml")
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, reference in (("plain", False), ("ip-adapter", True)):
            spec = _spec(folder, args.size, args.steps, reference)
            # a warm-up run builds the tiny models into the cache, so the timed run measures generation only
            subprocess.run([sys.executable, "-c", _RUN, str(spec), str(folder / f"warm-{name}")], check=True,
                           capture_output=True)
            done = subprocess.run([sys.executable, "-c", _RUN, str(spec), str(folder / name)], check=True,
                                  capture_output=True, text=True)
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    plain = results["plain"]
    print(f"tiny Kolors, 8 frames, {args.size} px, {args.steps} steps, batch 4")
    print(f"{'story':<12}{'seconds':>10}{'x plain':>9}{'wall':>8}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['seconds']:>10.2f}{r['seconds'] / plain['seconds']:>9.2f}"
              f"{r['wall']:>8.2f}{r['wall'] / plain['wall']:>9.2f}"
              f"{r['peak'] / 2**20:>10.1f}{r['peak'] / max(plain['peak'], 1):>9.2f}")


if __name__ == "__main__":
    main()
