"""Benchmark (not a test): prep and story on Ray with 1 and 2 Ray workers, as ratios.

Each worker count gets a fresh local Ray instance with that many CPUs
(``ray.init(num_cpus=N)``) and runs `prep` with ``executor="ray"`` and
``num_proc=N`` (the pre-check's processes) on the same synthetic style set;
the best of ``--repeats`` wall times counts.  It prints pictures per second
for each and the 2-worker / 1-worker ratio.  On a machine with 2 cores the
ratio is bounded by the cores, which the driver, Ray's own processes and
the workers share.

    .venv/bin/python bench/bench_scale.py                 # 300 pictures, 512-640 px
    .venv/bin/python bench/bench_scale.py --pictures 1000

Story: the same tiny-model story (``--frames`` frames of ``--size`` px,
``--steps`` steps, one frame per batch so the batches can spread) is made
with ``ray: {workers: N}`` on a fresh local Ray instance with N CPUs, one
torch thread per worker; frames per second over the whole ``generate_story``
call (workers starting and loading the model included), best of
``--repeats``.  ``--only story`` or ``--only prep`` runs one half.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kstory  # noqa: E402,F401  (torchvision fix before Data-Juicer)


def prep_seconds(dataset: Path, out: Path, workers: int, repeats: int) -> float:
    import ray

    from kstory.core.ray_cluster import worker_runtime_env
    from kstory.prep import prep

    ray.init(num_cpus=workers, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())
    try:
        best = float("inf")
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            prep(dataset, out, executor="ray", num_proc=workers, show_progress=False)
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        ray.shutdown()


def story_seconds(spec: Path, out: Path, workers: int, repeats: int) -> float:
    import ray
    import torch

    from kstory.core.config import RaySettings
    from kstory.core.ray_cluster import worker_runtime_env
    from kstory.story import generate_story

    torch.set_num_threads(1)  # the workers take the driver's thread count: one each, one per CPU
    ray.init(num_cpus=workers, object_store_memory=150_000_000, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())
    try:
        best = float("inf")
        for _ in range(repeats):
            shutil.rmtree(out, ignore_errors=True)
            started = time.perf_counter()
            generate_story(spec, out, model="tiny", ray=RaySettings(workers=workers))
            best = min(best, time.perf_counter() - started)
        return best
    finally:
        ray.shutdown()


def write_story_spec(path: Path, frames: int, size: int, steps: int) -> Path:
    import yaml

    spec = {"title": "bench", "frame_count": frames,
            "character": {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": size, "height": size, "steps": steps, "cfg_scale": 5.0},
            "generation": {"batch_size": 1},
            "frames": [{"prompt": f"a fox, scene {i}", "seed": i} for i in range(1, frames + 1)]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def bench_story(tmp: Path, args: argparse.Namespace) -> None:
    spec = write_story_spec(tmp / "story.yaml", args.frames, args.size, args.steps)
    rates = {}
    for workers in (1, 2):
        seconds = story_seconds(spec, tmp / f"story{workers}", workers, args.repeats)
        rates[workers] = args.frames / seconds
        print(f"story on Ray, {workers} worker(s): {rates[workers]:.2f} frames/s ({seconds:.1f} s)", flush=True)
    print(f"story frames/s, 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (on {os.cpu_count()} cores)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--frames", type=int, default=8, help="story frames")
    parser.add_argument("--size", type=int, default=256, help="story frame side in pixels")
    parser.add_argument("--steps", type=int, default=8, help="story sampling steps")
    parser.add_argument("--only", choices=["prep", "story"], help="run one half")
    args = parser.parse_args()
    from kstory.prep.synthetic import make_style_dataset

    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "prep":
            bench_story(Path(tmp), args)
        if args.only == "story":
            return
        dataset = make_style_dataset(Path(tmp) / "set", n=args.pictures, seed=0, defects=False)
        rates = {}
        for workers in (1, 2):
            seconds = prep_seconds(dataset, Path(tmp) / f"out{workers}", workers, args.repeats)
            rates[workers] = args.pictures / seconds
            print(f"prep on Ray, {workers} worker(s): {rates[workers]:.1f} pictures/s ({seconds:.1f} s)", flush=True)
    print(f"prep images/s, 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
