"""Benchmark (not a test): prep on Data-Juicer's Ray executor with 1 and 2 Ray workers, as a ratio.

Each worker count gets a fresh local Ray instance with that many CPUs
(``ray.init(num_cpus=N)``) and runs `prep` with ``executor="ray"`` and
``num_proc=N`` (the pre-check's processes) on the same synthetic style set;
the best of ``--repeats`` wall times counts.  It prints pictures per second
for each and the 2-worker / 1-worker ratio.  On a machine with 2 cores the
ratio is bounded by the cores, which the driver, Ray's own processes and
the workers share.

    .venv/bin/python bench/bench_scale.py                 # 300 pictures, 512-640 px
    .venv/bin/python bench/bench_scale.py --pictures 1000

Story frames/s over a pool of Ray workers is not measured here: story on
Ray is not built yet (docs/scale-out.md).
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pictures", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from kstory.prep.synthetic import make_style_dataset

    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_style_dataset(Path(tmp) / "set", n=args.pictures, seed=0, defects=False)
        rates = {}
        for workers in (1, 2):
            seconds = prep_seconds(dataset, Path(tmp) / f"out{workers}", workers, args.repeats)
            rates[workers] = args.pictures / seconds
            print(f"prep on Ray, {workers} worker(s): {rates[workers]:.1f} pictures/s ({seconds:.1f} s)", flush=True)
    print(f"prep images/s, 2 workers / 1 worker: {rates[2] / rates[1]:.2f}x (on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
