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
    """The user's spec with each frame's seed and prompt replaced by the manifest's."""
    data = yaml.safe_load(spec_text) or {}
    frames = data.get("frames") or []
    changed = []
    for index, (seed, prompt) in sorted(effective_frames(manifest).items()):
        if not 1 <= index <= len(frames):
            continue
        frame = frames[index - 1]
        if (frame.get("seed"), frame.get("prompt")) != (seed, prompt):
            frame["seed"], frame["prompt"] = seed, prompt
            changed.append(index)
    if not changed:
        return spec_text
    header = _HEADER.format(frames=", ".join(str(i) for i in changed))
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
