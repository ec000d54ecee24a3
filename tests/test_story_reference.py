"""The character reference (Kolors IP-Adapter-Plus) in a story: spec, per-frame tokens, frame references, manifest.

Runs the tiny Kolors and the tiny random adapter on the CPU at 64 px, 2 steps,
through the real DiffSynth pipeline pieces and transformers' CLIP.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_spec(path: Path, items: list[dict], reference: dict | None = None, **top) -> Path:
    character = {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"}
    if reference is not None:
        character["reference"] = reference
    spec = {"title": "test story", "frame_count": len(items), "character": character,
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0}, **top, "frames": items}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def reference_png(path: Path) -> Path:
    rng = np.random.default_rng(5)
    Image.fromarray(rng.integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(path)
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


FRAMES = [{"prompt": "walks", "seed": 11}, {"prompt": "sits", "seed": 12}]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return story.generate_story(write_spec(root / "story.yaml", FRAMES), root / "out", model="tiny")


def test_scale_zero_frame_is_bit_identical_to_no_adapter(tmp_path, plain):
    """Frame 1 at scale 0 shares a batch with frame 2 at scale 1: frame 1 equals the story without the adapter."""
    reference_png(tmp_path / "fox.png")
    spec = write_spec(tmp_path / "story.yaml", [{**FRAMES[0], "reference_scale": 0.0}, FRAMES[1]],
                      {"image": "fox.png", "adapter": "tiny", "scale": 1.0})
    result = story.generate_story(spec, tmp_path / "out", model="tiny")
    assert np.array_equal(pixels(result.frames[1]), pixels(plain.frames[1]))
    assert not np.array_equal(pixels(result.frames[2]), pixels(plain.frames[2]))
    manifest = json.loads(result.manifest_path.read_text())
    entry = manifest["frames"]["2"]["ip_adapter"]
    assert entry["scale"] == 1.0 and (entry["start"], entry["end"]) == (0.0, 1.0)
    assert entry["reference"]["file"] == "references/character.png"
    assert entry["reference"]["sha256"] == manifest["frames"]["1"]["ip_adapter"]["reference"]["sha256"]
    assert (result.out_dir / "references" / "character.png").read_bytes() == (tmp_path / "fox.png").read_bytes()
    assert manifest["ip_adapter"]["tiny"] and len(manifest["ip_adapter"]["sha256"]) == 64
    # the same spec again: every frame's key matches, nothing is generated
    again = story.generate_story(spec, tmp_path / "out", model="tiny")
    assert again.generated == []


def test_a_closed_window_is_no_adapter(tmp_path, plain):
    reference_png(tmp_path / "fox.png")
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {"image": "fox.png", "adapter": "tiny", "scale": 2.0,
                                                        "start": 0.0, "end": 0.4})
    result = story.generate_story(spec, tmp_path / "out", model="tiny")  # 2 steps: step 0 needs end >= 0.5
    for index in (1, 2):
        assert np.array_equal(pixels(result.frames[index]), pixels(plain.frames[index]))


def test_frame_reference_is_made_first_and_rerolls_reproduce(tmp_path):
    items = [*FRAMES, {"prompt": "runs", "seed": 13}]
    spec = write_spec(tmp_path / "story.yaml", items, {"frame": 1, "adapter": "tiny", "scale": 0.8},
                      generation={"batch_size": 4})
    result = story.generate_story(spec, tmp_path / "out", model="tiny")
    manifest = json.loads(result.manifest_path.read_text())
    frames = manifest["frames"]
    assert "ip_adapter" not in frames["1"] and frames["1"]["batch"] == [1]
    assert frames["2"]["batch"] == [2, 3]  # the frames that use frame 1 wait for it
    for key in ("2", "3"):
        assert frames[key]["ip_adapter"]["reference"] == {"frame": 1, "sha256": frames["1"]["sha256"]}
        assert frames[key]["ip_adapter"]["scale"] == 0.8
    before = frames["2"]["sha256"]
    rolled = story.reroll(tmp_path / "out", 2, seed=12)  # the same seed: the same picture again
    assert json.loads(rolled.manifest_path.read_text())["frames"]["2"]["sha256"] == before


@pytest.mark.parametrize("reference, frames, message", [
    ({"frame": 4}, FRAMES, "line 8: character.reference.frame: no frame 4"),
    ({"frame": 1, "frames": [1, 2]}, FRAMES, "frame 1 is the character reference and cannot use itself"),
    ({"frame": 2}, [FRAMES[0], {**FRAMES[1], "reference_scale": 0.5}], "line 19: frame 2 is the character reference"),
    ({"image": "fox.png", "frames": [3]}, FRAMES, "character.reference.frames.0: no frame 3"),
    ({"image": "fox.png", "scale": 2.5}, FRAMES, "character.reference.scale: Input should be less than or equal to 2"),
    ({"image": "fox.png", "frame": 1}, FRAMES, "give exactly one of image, frame"),
])
def test_reference_spec_errors_name_the_line(tmp_path, reference, frames, message):
    spec = write_spec(tmp_path / "story.yaml", frames, reference)
    with pytest.raises(KstoryError, match=message):
        load_spec(spec)


def test_missing_or_broken_reference_image_is_named(tmp_path):
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {"image": "gone.png", "adapter": "tiny"})
    with pytest.raises(KstoryError, match="gone.png: character reference image cannot be read"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {"image": "broken.png", "adapter": "tiny"})
    with pytest.raises(KstoryError, match="broken.png: character reference image is not a readable picture"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
    reference_png(tmp_path / "fox.png")
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {"image": "fox.png"})
    with pytest.raises(KstoryError, match="needs the Kolors IP-Adapter-Plus, and none was given"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
