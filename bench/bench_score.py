"""Benchmark (not a test): `scoring.score_images` against the organisers' one-image-at-a-time loop.

Both score the same generated 1024 px frames (Kolors' output size) with the
same full-size CLIP ViT-L/14 aesthetic predictor (random weights, written in
the published format), in the same process, each loading the model once:

- the organisers' loop: ``AestheticsPredictorV2Linear.from_pretrained`` +
  ``CLIPProcessor``, ``Image.open`` and one forward pass per image;
- kstory: batches of ``--batch-size``, images decoded and preprocessed in a
  thread pool while the model runs.

It prints both rates (images per second, load included and scoring only),
their ratio, and the largest score difference (must stay within 1e-4).

    .venv/bin/python bench/bench_score.py                 # 64 images, batch 8
    .venv/bin/python bench/bench_score.py --images 128 --batch-size 16

The predictor (1.2 GB) is built once under $KSTORY_CACHE/bench-vit-l14-aesthetic.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import kstory  # noqa: F401  (torchvision import fix before transformers loads it)
import numpy as np
import torch
from PIL import Image

from kstory.core.models import default_cache_dir
from kstory.scoring import score_images
from kstory.scoring.tiny import TINY_HEAD_GAIN, VIT_L14_VISION, write_aesthetic_model


def predictor(cache: Path) -> Path:
    folder = cache / "bench-vit-l14-aesthetic"
    if not (folder / "model.safetensors").is_file():
        print(f"building a random-weight ViT-L/14 predictor in {folder} (once)")
        write_aesthetic_model(folder, VIT_L14_VISION, seed=0, head_bias=6.0, head_gain=TINY_HEAD_GAIN)
    return folder


def frames(folder: Path, count: int, size: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 256, (size // 32, size // 32, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BICUBIC).save(folder / f"frame_{i:03d}.png")
    return folder


def organisers_loop(model_dir: Path, folder: Path) -> tuple[dict[str, float], float, float]:
    """Their scoring code: load once, then open, preprocess and score each file in turn."""
    from aesthetics_predictor import AestheticsPredictorV2Linear
    from transformers import CLIPProcessor

    start = time.perf_counter()
    model = AestheticsPredictorV2Linear.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    loaded = time.perf_counter()
    scores = {}
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            inputs = processor(images=Image.open(os.path.join(folder, name)), return_tensors="pt")
            with torch.no_grad():
                scores[name] = model(**inputs).logits.tolist()[0][0]
    return scores, loaded - start, time.perf_counter() - loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="frames to score (default 64)")
    parser.add_argument("--size", type=int, default=1024, help="frame side in pixels (default 1024)")
    parser.add_argument("--batch-size", type=int, default=8, help="kstory's batch size (default 8, one story)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the frames go (default: a temp dir)")
    args = parser.parse_args()

    model_dir = predictor(default_cache_dir())
    with tempfile.TemporaryDirectory() as tmp:
        folder = frames((args.workdir or Path(tmp)) / "frames", args.images, args.size)
        print(f"{args.images} frames of {args.size} px, ViT-L/14 random weights, torch threads {torch.get_num_threads()}, "
              f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")

        reference, ref_load, ref_score = organisers_loop(model_dir, folder)
        start = time.perf_counter()
        report = score_images([folder], aesthetic_model=model_dir, clip_model=None, batch_size=args.batch_size)
        total = time.perf_counter() - start

    ours = {Path(image.file).name: image.aesthetic for image in report.images}
    diff = max(abs(ours[name] - value) for name, value in reference.items())
    n = len(reference)
    rows = [
        ("organisers' loop", ref_load, ref_score, n / (ref_load + ref_score), n / ref_score),
        (f"kstory (batch {args.batch_size})", report.timing.load_s, report.timing.score_s, n / total, n / report.timing.score_s),
    ]
    print(f"{'':24} {'load s':>7} {'score s':>8} {'img/s total':>12} {'img/s scoring':>14}")
    for label, load, score, rate_total, rate_score in rows:
        print(f"{label:24} {load:7.1f} {score:8.1f} {rate_total:12.3f} {rate_score:14.3f}")
    print(f"ratio kstory / organisers: {rows[1][3] / rows[0][3]:.2f}x end to end (load included), "
          f"{rows[1][4] / rows[0][4]:.2f}x scoring only")
    spread = max(reference.values()) - min(reference.values())
    print(f"scores: max |difference| {diff:.2e} over {n} images (spread of scores {spread:.3f}); "
          f"mean {report.mean:.6f} vs {sum(reference.values()) / n:.6f}: {'SAME' if diff <= 1e-4 else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
