"""The demo story: eight frames with built-in poses and one canny guide, small enough for the tiny model on CPU."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from kstory.core.atomic import write_bytes, write_text
from kstory.story.manifest import png_bytes
from kstory.story.samplers import DEFAULT_FOR_NEW_SPECS

DEMO_SHARING = {"share": 0.5, "layers": ["up"], "start_step": 1, "identity_frames": [1, 2], "frames": [3, 4]}
_FRAMES = (
    ("wakes up and stretches by the window at dawn", "arms_raised"),
    ("walks down a quiet village street", "walking"),
    ("waves to a friend across the market", "waving"),
    ("points at a map pinned to a wall", "pointing"),
    ("runs to catch the last train", "running"),
    ("sits on a bench and reads a letter", "sitting"),
    ("thinks under a street lamp at dusk", "thinking"),
)


def _reference_image(size: int) -> Image.Image:
    """A simple drawn scene (house and sun) for the canny guide, so the demo needs no input files."""
    image = Image.new("RGB", (size, size), (200, 220, 255))
    draw = ImageDraw.Draw(image)
    s = size / 128
    draw.rectangle([30 * s, 60 * s, 98 * s, 115 * s], fill=(180, 90, 60))
    draw.polygon([(22 * s, 62 * s), (64 * s, 25 * s), (106 * s, 62 * s)], fill=(120, 40, 40))
    draw.rectangle([56 * s, 85 * s, 72 * s, 115 * s], fill=(60, 40, 20))
    draw.ellipse([95 * s, 8 * s, 120 * s, 33 * s], fill=(255, 210, 0))
    return Image.fromarray(np.asarray(image))


def _character_image(size: int) -> Image.Image:
    """A drawn fox in a blue scarf: the demo's character reference (the tiny IP-Adapter reads it)."""
    image = Image.new("RGB", (size, size), (245, 240, 225))
    draw = ImageDraw.Draw(image)
    s = size / 128
    draw.ellipse([34 * s, 50 * s, 94 * s, 118 * s], fill=(220, 110, 40))  # body
    draw.ellipse([40 * s, 18 * s, 88 * s, 62 * s], fill=(230, 120, 45))  # head
    draw.polygon([(42 * s, 30 * s), (48 * s, 4 * s), (60 * s, 24 * s)], fill=(200, 90, 30))  # ears
    draw.polygon([(68 * s, 24 * s), (80 * s, 4 * s), (86 * s, 30 * s)], fill=(200, 90, 30))
    draw.rectangle([38 * s, 58 * s, 90 * s, 68 * s], fill=(40, 80, 200))  # scarf
    return Image.fromarray(np.asarray(image))


def make_demo_spec(
    path: Path, trigger_word: str, *, controlnets: Mapping[str, Path] | None = None, size: int = 128, steps: int = 4,
) -> Path:
    """Write an 8-frame demo spec to ``path`` (plus the canny reference beside it).

    Frames 1-7 use built-in poses through the "pose" ControlNet; frame 8 a
    canny guide through the "union" ControlNet, so both ControlNet kinds run.
    Frames 2, 3 and 5 take a drawn character reference through the tiny IP-Adapter (frame 5 at its own scale).
    Frames 1-2 are identity frames of consistent attention and frames 3-4 read
    their bank; 5-8 attend as usual (one batch, as without it).
    ``controlnets`` (name -> weights) is written into the spec when given.
    """
    path = Path(path)
    reference = path.parent / "story-reference.png"
    write_bytes(reference, png_bytes(_reference_image(size)))
    character = path.parent / "story-character.png"
    write_bytes(character, png_bytes(_character_image(size)))
    frames = [
        {"prompt": prompt, "seed": 1000 + i, "guides": [{"type": "pose", "pose": pose, "scale": 0.8}]}
        for i, (prompt, pose) in enumerate(_FRAMES, start=1)
    ]
    frames[4]["reference_scale"] = 0.8
    frames.append({
        "prompt": "comes home to the little house as the sun sets",
        "seed": 1008,
        "guides": [{"type": "canny", "image": reference.name, "controlnet": "union", "scale": 0.6, "end": 0.8}],
    })
    spec = {
        "title": "A day in the village",
        "frame_count": 8,
        "character": {
            "trigger_word": trigger_word,
            "description": "a small fox in a blue scarf",
            "style": "soft watercolour, warm light",
            "negative_prompt": "blurry, low quality, extra limbs, text, watermark",
            "reference": {"image": character.name, "adapter": "tiny", "frames": [2, 3], "scale": 0.5},
        },
        "defaults": {"width": size, "height": size, "steps": steps, "cfg_scale": 5.0, "sampler": DEFAULT_FOR_NEW_SPECS},
        "generation": {"batch_size": 4, "consistent_attention": DEMO_SHARING},
        "frames": frames,
    }
    if controlnets:
        spec["controlnets"] = {name: {"path": str(Path(p).resolve())} for name, p in sorted(controlnets.items())}
    header = "# kstory story spec (docs/story.md). Edit prompts and seeds; `kstory story` regenerates.\n"
    write_text(path, header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path
