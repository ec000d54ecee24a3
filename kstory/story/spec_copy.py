"""``story/story.yaml``: the spec as last generated, derived from the manifest.

The manifest is the source of truth for each frame (seed, prompt, guides,
sampler, re-rolls). The spec copy beside it is written from the user's spec
with every frame's seed and prompt taken from the manifest, so a re-rolled
frame shows its current seed there too, and anything that regenerates from
the copy (``kstory verify``) draws what the manifest says. When no frame
differs from the user's spec, the copy is the user's file byte for byte.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kstory.core.errors import KstoryError

SPEC_COPY = "story.yaml"
_HEADER = ("# The spec as last generated, written by kstory: frames {frames} were re-rolled, so their seed and\n"
           "# prompt come from manifest.json (the source of truth for each frame).\n")


def effective_frames(manifest: dict[str, Any]) -> dict[int, tuple[int, str]]:
    """Frame number -> (seed, frame prompt) as the manifest records them."""
    return {int(key): (int(record["seed"]), str(record["frame_prompt"])) for key, record in manifest["frames"].items()}


def derive_spec_text(spec_text: str, manifest: dict[str, Any]) -> str:
    """The spec with each frame's seed and prompt replaced by the manifest's.

    ``spec_text`` is the user's spec (a story run) or the story's own copy (a re-roll); both give the same
    text, since the header names every frame whose record differs from what the user's spec gave it
    (``spec_seed``, ``spec_frame_prompt``), not only the frames this call changed.
    """
    data = yaml.safe_load(spec_text) or {}
    frames = data.get("frames") or []
    changed, rerolled = [], []
    for index, (seed, prompt) in sorted(effective_frames(manifest).items()):
        if not 1 <= index <= len(frames):
            continue
        frame, record = frames[index - 1], manifest["frames"][str(index)]
        differs = (frame.get("seed"), frame.get("prompt")) != (seed, prompt)
        if differs:
            frame["seed"], frame["prompt"] = seed, prompt
            changed.append(index)
        given = (record.get("spec_seed"), record.get("spec_frame_prompt"))
        if (given != (seed, prompt)) if "spec_seed" in record else differs:
            rerolled.append(index)
    if not changed and not rerolled:
        return spec_text
    header = _HEADER.format(frames=", ".join(str(i) for i in rerolled or changed))
    return header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def disagreements(spec_copy: Path, manifest: dict[str, Any]) -> list[str]:
    """Where the spec copy and the manifest disagree on a frame's seed or prompt (empty: they agree)."""
    try:
        data = yaml.safe_load(spec_copy.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise KstoryError(f"cannot read the story's spec copy: {error}", path=spec_copy,
                          fix="generate the story again with `kstory story`") from error
    frames = data.get("frames") or []
    problems = []
    for index, (seed, prompt) in sorted(effective_frames(manifest).items()):
        if not 1 <= index <= len(frames):
            problems.append(f"frame {index} is in manifest.json but not in {spec_copy.name}")
            continue
        frame = frames[index - 1]
        if frame.get("seed") != seed:
            problems.append(f"frame {index}: seed {frame.get('seed')} in {spec_copy.name}, {seed} in manifest.json")
        if frame.get("prompt") != prompt:
            problems.append(f"frame {index}: the prompt in {spec_copy.name} is not the one in manifest.json")
    return problems
