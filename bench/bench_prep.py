"""Benchmark (not a test): `data_prep.prep` against the Kolors baseline's plain `dj-process` run.

The ModelScope Kolors LoRA baseline notebook cleans its data with a two-op
Data-Juicer recipe (image_shape_filter with a 1024 px minimum side +
image_aspect_ratio_filter 0.5-2.0, over an image-caption metadata.jsonl) run
by `dj-process --config`.  This script generates clean synthetic style sets
(>= 500 pictures each), runs both tools on the same set, each as a fresh
process so both pay their imports and start-up, alternating and repeating to
dampen noise from other load (the best wall time counts), and prints pictures
per second side by side:

- end to end: input samples / wall time of one run, start-up included;
- per picture: from two set sizes, (N2 - N1) / (t2 - t1), i.e. the cost of
  each additional picture with the fixed start-up cost taken out.

    .venv/bin/python bench/bench_prep.py                  # 500 and 1500 pictures, 1024-1280 px
    .venv/bin/python bench/bench_prep.py --scale 1        # 512-640 px pictures

By default the pictures are 1024-1280 px, the size Kolors trains at and the
smallest the notebook's recipe keeps, and the baseline runs that recipe as
written.  Smaller pictures (``--scale 1``) would all fail its 1024 px minimum,
so there it uses kstory's minimum side (512) instead; both tools keep every
picture either way.  Both use the same number of processes.

The sets have no defects: with Data-Juicer's default skip_op_error, one
unreadable file makes the baseline silently drop the whole batch it is in
(half of a 1500-picture set with np 2), which would flatter its speed.  prep
does more per picture (truncation and pixel-bomb checks, a perceptual hash
for deduplication, caption cleaning, copying the kept pictures) but decodes
each picture once, where the baseline decodes it once per op.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DJ_PROCESS = Path(sys.executable).with_name("dj-process")
TOOLS = ("kstory prep", "dj-process baseline")
NOTEBOOK_MIN_SIDE = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[500, 1500], help="two set sizes, each >= 500")
    parser.add_argument("--scale", type=float, default=2.0, help="picture size: 2.0 = 1024-1280 px, 1.0 = 512-640 px")
    parser.add_argument("--num-proc", type=int, default=2, help="processes for prep and for the baseline's np")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and size; the best wall time counts")
    parser.add_argument("--workdir", type=Path, default=None, help="where data and outputs go (default: a temp dir)")
    args = parser.parse_args()
    small, large = sorted(args.sizes)
    if small < 500 or small == large:
        parser.error("--sizes needs two different sizes, both >= 500")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench_prep."))

    samples: dict[int, int] = {}
    best: dict[tuple[str, int], float] = {}
    for n in (small, large):
        dataset = _dataset(workdir / f"clean_{n}_x{args.scale}", n, args.scale)
        with open(dataset / "metadata.csv", encoding="utf-8") as handle:
            samples[n] = sum(1 for _ in csv.DictReader(handle))
        commands = {
            "kstory prep": [sys.executable, "-c", _prep_code(dataset, workdir / f"prep_out_{n}", args.num_proc)],
            "dj-process baseline": [
                str(DJ_PROCESS),
                "--config",
                str(_baseline_config(dataset, args.num_proc, min_side=_baseline_min_side(args.scale))),
            ],
        }
        for round_ in range(1, args.repeat + 1):
            for tool, command in commands.items():
                if tool == TOOLS[0]:  # a new output folder, as on a first run
                    shutil.rmtree(workdir / f"prep_out_{n}", ignore_errors=True)
                seconds = _timed(command, workdir)
                best[tool, n] = min(best.get((tool, n), float("inf")), seconds)
                print(f"{n} pictures, round {round_}: {tool:20} {seconds:6.2f} s", flush=True)

    print(
        f"\n{os.cpu_count()} CPUs, {args.num_proc} processes, pictures {_smallest_side(args.scale)}+ px, baseline "
        f"minimum side {_baseline_min_side(args.scale)} px (best of {args.repeat} runs each)"
    )
    print(f"{'':34}{TOOLS[0]:>24}{TOOLS[1]:>24}{'prep/baseline':>15}")
    for n in (small, large):
        rates = [samples[n] / best[tool, n] for tool in TOOLS]
        label = f"end to end, {samples[n]} samples"
        cells = "".join(f"{_cell(rate, best[tool, n]):>24}" for rate, tool in zip(rates, TOOLS, strict=True))
        print(f"{label:34}{cells}{rates[0] / rates[1]:>14.2f}x")
    marginal = [(samples[large] - samples[small]) / (best[tool, large] - best[tool, small]) for tool in TOOLS]
    cells = "".join(f"{rate:>18.1f} pic/s" for rate in marginal)
    print(f"{'per additional picture':34}{cells}{marginal[0] / marginal[1]:>14.2f}x")
    verdict = "not slower" if marginal[0] >= marginal[1] else "SLOWER"
    print(f"per picture, prep is {verdict} than the baseline: {marginal[0] / marginal[1]:.2f}x its throughput")
    report = json.loads((workdir / f"prep_out_{large}" / "report.json").read_text(encoding="utf-8"))
    print(f"prep on {samples[large]} samples: kept {report['counts']['kept']}, dropped {report['dropped_by']}")


def _dataset(folder: Path, n: int, scale: float) -> Path:
    if not folder.exists():
        print(f"generating {n} pictures at scale {scale} in {folder} ...", flush=True)
        code = (
            "import kstory, data_prep.synthetic as s; "
            f"s.make_style_dataset({str(folder)!r}, {n}, seed=1, defects=False, scale={scale})"
        )
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
    return folder


def _prep_code(dataset: Path, out: Path, num_proc: int) -> str:
    return (
        "import kstory, pathlib, data_prep; "
        f"data_prep.prep({str(dataset)!r}, pathlib.Path({str(out)!r}), num_proc={num_proc}, "
        "show_progress=False)"
    )


def _smallest_side(scale: float) -> int:
    from kstory.prep.synthetic import SIZES

    return round(min(min(size) for size in SIZES) * scale)


def _baseline_min_side(scale: float) -> int:
    """The notebook's 1024 px when every generated picture reaches it, else kstory's default minimum."""
    recipe = yaml.safe_load((REPO / "kstory" / "prep" / "recipes" / "default.yaml").read_text(encoding="utf-8"))
    ours = {name: op_args for entry in recipe["process"] for name, op_args in entry.items()}
    return NOTEBOOK_MIN_SIDE if _smallest_side(scale) >= NOTEBOOK_MIN_SIDE else ours["image_shape_filter"]["min_width"]


def _baseline_config(dataset: Path, num_proc: int, *, min_side: int) -> Path:
    """The notebook's metadata.jsonl + two-filter YAML."""
    folder = dataset.with_name(dataset.name + "_baseline")
    folder.mkdir(exist_ok=True)
    with open(dataset / "metadata.csv", encoding="utf-8") as rows, open(folder / "metadata.jsonl", "w") as jsonl:
        for row in csv.DictReader(rows):
            record = {"text": row["text"], "image": [str(dataset / row["file_name"])]}
            jsonl.write(json.dumps(record, ensure_ascii=False) + "\n")
    config = {
        "project_name": "data-process",
        "dataset_path": str(folder / "metadata.jsonl"),
        "np": num_proc,
        "text_keys": "text",
        "image_key": "image",
        "image_special_token": "<__dj__image>",
        "export_path": str(folder / "output" / "result.jsonl"),
        "process": [
            {"image_shape_filter": {"min_width": min_side, "min_height": min_side, "any_or_all": "any"}},
            {"image_aspect_ratio_filter": {"min_ratio": 0.5, "max_ratio": 2.0, "any_or_all": "any"}},
        ],
    }
    path = folder / "data_juicer_config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _timed(command: list[str], workdir: Path) -> float:
    """Wall time of ``command``; each run gets a cold Hugging Face datasets cache, as on a first run."""
    cache = Path(tempfile.mkdtemp(dir=workdir, prefix="hf_cache."))
    try:
        started = time.perf_counter()
        env = {**os.environ, "HF_DATASETS_CACHE": str(cache)}
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        seconds = time.perf_counter() - started
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if completed.returncode != 0:
        sys.exit(f"{command[0]} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
    return seconds


def _cell(rate: float, seconds: float) -> str:
    return f"{rate:6.1f} pic/s ({seconds:5.1f} s)"


if __name__ == "__main__":
    main()
