"""Best-of-N search: time to the goal with a preview pass, against rendering every candidate at full quality.

    python bench/bench_search.py                       # tiny Kolors, 8 frames, 128 px, 8 steps, 8 candidates
    python bench/bench_search.py --candidates 6 --steps 6 --preview-steps 2 --preview-scale 0.5 --keep 3

Both sides search copies of the same story with the real search code
(kstory.submissions.search): the baseline renders all N candidates of every
frame at full quality, the other previews all N (fewer steps, smaller frames)
and renders only the ``--keep`` best previews of each frame at full quality,
stopping as soon as the goal is met. The goal is set from the baseline's own
full-quality scores: the mean over frames of each frame's ``--keep``-th best
score, so it is reachable exactly when the preview ranks the good candidates
near the top.

Which scorer, and why: the tiny Kolors and the tiny predictor have random
weights, so their aesthetic scores are not a quality signal, and a rank
correlation between two random functions would say nothing. This bench scores
with an image statistic that means something on any picture: colourfulness
(Hasler and Suesstrunk 2003: the spread and mean of the opponent colour
channels rg = R - G and yb = (R + G)/2 - B), deterministic and defined below.
The identity embedding is each picture's mean and standard deviation per RGB
channel. What is measured is how well a cheap render predicts a property of the
full render of the same seed, and what the pruning saves; not aesthetics.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import kstory  # noqa: E402,F401  (before anything that imports torchvision/diffsynth)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402


@dataclass(frozen=True)
class StatScore:
    aesthetic: float
    clip_t: None
    embedding: np.ndarray


class Colourfulness:
    """Hasler-Suesstrunk colourfulness as the 'aesthetic', per-channel mean/std as the identity embedding."""

    identity = {"aesthetic": "bench:colourfulness (Hasler-Suesstrunk 2003)", "clip": None, "random_weights": False}

    def score(self, images, prompts):
        out = []
        for image in images:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
            rg = rgb[..., 0] - rgb[..., 1]
            yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
            value = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
            embed = np.concatenate([rgb.mean(axis=(0, 1)), rgb.std(axis=(0, 1))]) / 255.0
            out.append(StatScore(float(value), None, embed))
        return out


def _spec(path: Path, frames: int, size: int, steps: int, batch: int) -> Path:
    from kstory.story import build_tiny_controlnets

    poses = ("standing", "walking", "waving", "pointing", "running", "sitting", "thinking", "arms_raised")
    pose = build_tiny_controlnets()["pose"]
    spec = {"title": "search bench", "frame_count": frames,
            "character": {"trigger_word": "ks", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": size, "height": size, "steps": steps}, "generation": {"batch_size": batch},
            "controlnets": {"pose": {"path": str(pose)}},
            "frames": [{"prompt": f"the fox is {poses[i % len(poses)]}", "seed": 5000 + i,
                        "guides": [{"type": "pose", "pose": poses[i % len(poses)], "scale": 0.8}]}
                       for i in range(frames)]}
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _scores(story_dir: Path, quality: str) -> dict[tuple[int, int], float]:
    import json

    manifest = json.loads((story_dir / "manifest.json").read_text(encoding="utf-8"))
    return {(int(k), c["seed"]): c["aesthetic"] for k, f in manifest["frames"].items()
            for c in f.get("search", {}).get("candidates", []) if c["quality"] == quality}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--preview-steps", type=int, default=2)
    parser.add_argument("--preview-scale", type=float, default=0.5)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from kstory.story import generate_story
    from kstory.submissions.search import SearchSettings, search_story

    scorer = Colourfulness()
    with tempfile.TemporaryDirectory(prefix="kstory-bench-search-") as tmp:
        root = Path(tmp)
        spec = _spec(root / "story.yaml", args.frames, args.size, args.steps, args.batch_size)
        generate_story(spec, root / "base" / "story", model="tiny")
        for name in ("full", "preview"):
            shutil.copytree(root / "base", root / name)

        started = time.perf_counter()
        full = search_story(root / "full", SearchSettings(candidates=args.candidates, threshold=1e9, margin=0.0),
                            scorer=scorer)
        full_s = time.perf_counter() - started
        full_scores = _scores(root / "full" / "story", "full")
        by_frame: dict[int, list[float]] = {}
        for (frame, _), value in full_scores.items():
            by_frame.setdefault(frame, []).append(value)
        goal = float(np.mean([sorted(v, reverse=True)[min(args.keep, len(v)) - 1] for v in by_frame.values()]))

        started = time.perf_counter()
        preview = search_story(root / "preview", SearchSettings(
            candidates=args.candidates, threshold=goal, margin=0.0, preview_steps=args.preview_steps,
            preview_scale=args.preview_scale, keep=args.keep), scorer=scorer)
        preview_s = time.perf_counter() - started
        to_goal = preview.seconds_to_goal if preview.seconds_to_goal is not None else preview_s
        previews = _scores(root / "preview" / "story", "preview")

    pairs = [(previews[k], full_scores[k]) for k in sorted(full_scores) if k in previews]
    per_frame = []
    for frame in sorted(by_frame):
        own = [(p, f) for (fr, _), (p, f) in zip(sorted(k for k in full_scores if k in previews), pairs) if fr == frame]
        if len(own) >= 3:
            per_frame.append(_spearman([p for p, _ in own], [f for _, f in own]))
    pw, ph = max(64, round(args.size * args.preview_scale / 64) * 64), args.preview_steps
    print(f"tiny Kolors (random weights), {args.frames} frames, {args.size} px, {args.steps} steps, batch "
          f"{args.batch_size}, {args.candidates} candidates per frame, torch threads {args.threads}, CPU")
    print("scorer: colourfulness (Hasler-Suesstrunk), an image statistic defined in this bench, not aesthetics")
    print(f"goal: mean colourfulness >= {goal:.3f} (each frame's {args.keep}. best full-quality score, averaged)")
    print(f"all candidates at full quality: {full_s:6.1f} s  ({full.rendered} full renders)")
    print(f"preview {pw} px / {ph} steps, keep {args.keep}: {to_goal:6.1f} s to the goal "
          f"({'met' if preview.selection.met else 'NOT met'}; {preview_s:.1f} s in all, {preview.rendered} renders)")
    print(f"time to goal, preview / all full: {to_goal / full_s:.2f}")
    print(f"preview/full rank correlation (Spearman): pooled {_spearman(*zip(*pairs)):.3f} over {len(pairs)} "
          f"candidates; per frame mean {np.mean(per_frame):.3f} (min {np.min(per_frame):.3f})")


if __name__ == "__main__":
    main()
