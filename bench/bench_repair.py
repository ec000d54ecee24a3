"""What fixing part of a frame costs next to re-rolling it: `kstory inpaint` vs `kstory reroll`, same frame.

    python bench/bench_repair.py                       # tiny Kolors, 128 px, 8 Euler steps, 3 rounds
    python bench/bench_repair.py --size 256 --steps 20

All sides are the library calls behind the commands, on one story folder
in one process, alternated round by round (so a busy machine slows them alike)
and reported as the median per call:

* **re-roll**: ``kstory reroll STORY 1 --seed N`` (the frame's whole batch from noise);
* **inpaint**: ``kstory inpaint STORY 1 --mask M`` (latent blending at strength 1);
* **inpaint + crop**: the same with ``--crop-padding 8`` (the box around the mask at full size);
* **inpaint, Kolors-Inpainting**: ``--inpaint-model tiny`` (the 9-channel UNet, loaded beside the base one).

Each call loads what it needs (text encoder, UNet, VAE, and for a repair the
VAE encoder), writes the story anew in staging and moves the old one to
``.history/``, as the commands do. The mask is a quarter of the frame.
Weights are random: the numbers are about time only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)


def _story(root: Path, size: int, steps: int) -> Path:
    import yaml

    import kstory.story as story

    spec = {"title": "bench", "frame_count": 2, "character": {"trigger_word": "kstory style"},
            "defaults": {"width": size, "height": size, "steps": steps, "cfg_scale": 5.0, "sampler": "euler"},
            "generation": {"batch_size": 1},
            "frames": [{"prompt": "a fox in a garden", "seed": 1}, {"prompt": "a cat", "seed": 2}]}
    (root / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    story.generate_story(root / "story.yaml", root / "story", model="tiny")
    return root / "story"


def _mask(path: Path, size: int) -> Path:
    from PIL import Image

    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, size * 3 // 4, size * 3 // 4))  # a quarter of the frame
    mask.save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128, help="frame width and height (multiple of 64)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import torch

    from kstory.core.logs import get_logger
    from kstory.story import reroll
    from kstory.story.repair_frame import repair_frame

    get_logger("story").setLevel("WARNING")
    with tempfile.TemporaryDirectory(prefix="kstory-bench-repair-") as tmp:
        root = Path(tmp)
        out = _story(root, args.size, args.steps)
        mask = _mask(root / "mask.png", args.size)
        sides = {
            "re-roll (whole frame)": lambda seed: reroll(out, 1, seed=seed),
            "inpaint (blending)": lambda seed: repair_frame(out, 1, kind="inpaint", strength=1.0, seed=seed, mask=mask),
            "inpaint + crop 8 px": lambda seed: repair_frame(out, 1, kind="inpaint", strength=1.0, seed=seed,
                                                              mask=mask, crop_padding=8),
            "inpaint, Kolors-Inpainting": lambda seed: repair_frame(out, 1, kind="inpaint", strength=1.0, seed=seed,
                                                                     mask=mask, inpaint_model="tiny"),
        }
        sides["inpaint, Kolors-Inpainting"](999)  # builds the tiny inpainting model once, outside the timing
        times: dict[str, list[float]] = {name: [] for name in sides}
        seed = 100
        for _ in range(args.rounds):
            for name, call in sides.items():
                seed += 1
                started = time.perf_counter()
                call(seed)
                times[name].append(time.perf_counter() - started)
    base = statistics.median(times["re-roll (whole frame)"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"tiny Kolors, {args.size}x{args.size} px, {args.steps} Euler steps, mask = a quarter of the frame, "
          f"{args.rounds} rounds, {device}, {torch.get_num_threads()} threads")
    print(f"{'side':<30} {'median s':>9} {'x re-roll':>10}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<30} {median:>9.2f} {median / base:>10.2f}")


if __name__ == "__main__":
    main()
