"""``kstory search RUN``: the command line of the best-of-N search (kstory.submissions.search).

The scorer loads first, so missing predictor weights stop the command before
anything renders; the exit status is the gate's (0 goal met, 3 not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kstory.core.runlog import logging_to_run


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="run folder (runs/NAME) or its story folder")
    parser.add_argument("--candidates", type=int, help="seeds per frame (default: the spec's generation.candidates)")
    parser.add_argument("--aesthetic-model", default="kolors-challenge",
                        help="kolors-challenge (the organisers' predictor, default), a predictor folder, LAION's "
                        "MLP file, or tiny (offline, random: a dry run whose scores mean nothing)")
    parser.add_argument("--clip-model", default="auto",
                        help="open_clip model for CLIP-T and identity (auto: tiny with the tiny predictor, else "
                        "ViT-L-14:openai); none searches on aesthetics alone")
    parser.add_argument("--threshold", type=float, default=6.0, help="the gate on the mean aesthetic (default: 6)")
    parser.add_argument("--margin", type=float, default=0.1, help="reach the gate by this much (default: 0.1)")
    parser.add_argument("--clip-t-floor", type=float, help="every frame's CLIP-T at least this (default: no floor)")
    parser.add_argument("--preview-steps", type=int, help="preview pass: render every candidate with this many "
                        "steps first and only the --keep best at full quality")
    parser.add_argument("--preview-scale", type=float, default=1.0,
                        help="preview pass: frame sides times this, rounded to 64 px (default: 1, full size)")
    parser.add_argument("--keep", type=int, default=2, help="with a preview pass: candidates per frame rendered at "
                        "full quality, best preview first (default: 2)")
    parser.add_argument("--controlnet", action="append", metavar="NAME=PATH", help="moved ControlNet weights")
    parser.add_argument("--device", help="scorer device: cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--cache-dir", help="model cache (default: $KSTORY_CACHE or ~/.cache/kstory)")


def run_search(args: argparse.Namespace) -> int:
    from kstory.cli import _controlnet_args
    from kstory.cli.stages import controlnet_paths
    from kstory.scoring.in_memory import load_in_memory_scorer
    from kstory.submissions.search import SearchSettings, search_story, story_dir_of

    cache_dir = Path(args.cache_dir) if args.cache_dir else None
    story = story_dir_of(Path(args.run))
    with logging_to_run(story, "search"):
        scorer = load_in_memory_scorer(args.aesthetic_model, device=args.device, cache_dir=cache_dir,
                                       clip_model=None if args.clip_model == "none" else args.clip_model)
        settings = SearchSettings(candidates=args.candidates, threshold=args.threshold, margin=args.margin,
                                  clip_t_floor=args.clip_t_floor, preview_steps=args.preview_steps,
                                  preview_scale=args.preview_scale, keep=args.keep)
        result = search_story(story, settings, scorer=scorer, cache_dir=cache_dir,
                              controlnets=controlnet_paths(_controlnet_args(args.controlnet), cache_dir) or None)
    print(result.render())
    if result.changed:
        print(f"story updated: {story}; every candidate: {story.parent / 'candidates'}; "
              f"score it for the package: kstory score {story.parent}")
    return result.exit_status
