"""Story spec validation: every mistake is named with its line, before any model loads."""

from __future__ import annotations

import re

import pytest
import yaml

from kstory.core.errors import KstoryError
from kstory.story.spec import load_spec


def write_spec(path, items, **top):
    spec = {"title": "t", "frame_count": top.pop("frame_count", len(items)),
            "character": {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 2}, **top, "frames": items}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def frames(count, **extra):
    return [{"prompt": f"scene {i}", "seed": 100 + i, **extra} for i in range(1, count + 1)]


def _error(path) -> str:
    with pytest.raises(KstoryError) as info:
        load_spec(path)
    return str(info.value)


def test_defaults_follow_kolors_recommendations(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"title": "t", "frames": frames(8)}), encoding="utf-8")
    spec = load_spec(path)
    assert spec.frame_count == 8
    assert spec.settings(1) == (1024, 1024, 30, 5.0)
    assert spec.prompt(1) == "scene 1"


def test_frame_overrides_and_prompt_composition(tmp_path):
    items = frames(2)
    items[1].update(width=128, steps=3, cfg_scale=4.0, negative_prompt="dark")
    spec = load_spec(write_spec(tmp_path / "s.yaml", items))
    assert spec.settings(2) == (128, 64, 3, 4.0)
    assert spec.prompt(2) == "kstory style, a fox, scene 2"
    assert spec.negative_prompt(1) == "blurry" and spec.negative_prompt(2) == "dark"


def test_wrong_frame_count_is_refused(tmp_path):
    message = _error(write_spec(tmp_path / "s.yaml", frames(7), frame_count=8))
    assert "exactly 8 frames" in message and "has 7" in message


def test_frame_count_is_configurable(tmp_path):
    assert load_spec(write_spec(tmp_path / "s.yaml", frames(3))).frame_count == 3


def test_missing_seed_names_the_frame_and_line(tmp_path):
    items = frames(8)
    del items[4]["seed"]
    path = write_spec(tmp_path / "s.yaml", items)
    message = _error(path)
    assert "frames.4.seed" in message and "required" in message.lower()
    line = int(re.search(r"line (\d+): frames\.4\.seed", message).group(1))
    assert "scene 5" in path.read_text().splitlines()[line - 1]


def test_unknown_pose_lists_the_library(tmp_path):
    items = frames(1, guides=[{"type": "pose", "pose": "moonwalk"}])
    message = _error(write_spec(tmp_path / "s.yaml", items))
    assert "unknown pose 'moonwalk'" in message and "walking" in message and "line" in message


def test_keypoints_outside_the_image_are_refused(tmp_path):
    body = [32.0, 10.0, 1.0] * 18
    body[3:6] = [80.0, 20.0, 1.0]  # neck at x=80 on a 64 px frame
    items = frames(1, guides=[{"type": "pose", "keypoints": {"people": [{"pose_keypoints_2d": body}]}}])
    message = _error(write_spec(tmp_path / "s.yaml", items))
    assert "keypoint 1 (80, 20) is outside the 64x64 image" in message and "line" in message


def test_hidden_keypoints_may_lie_anywhere(tmp_path):
    body = [32.0, 10.0, 1.0] * 18
    body[3:6] = [-5.0, 900.0, 0.0]
    items = frames(1, guides=[{"type": "pose", "keypoints": {"people": [{"pose_keypoints_2d": body}]}}])
    load_spec(write_spec(tmp_path / "s.yaml", items))


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"width": 100}, "multiple of 64"),
        ({"guides": [{"type": "pose", "pose": "standing", "start": 0.6, "end": 0.5}]}, "must be below end"),
        ({"guides": [{"type": "canny", "image": "a.png", "low_threshold": 300, "high_threshold": 100}]}, "low_threshold"),
        ({"guides": [{"type": "pose"}]}, "exactly one of pose, keypoints, image"),
        ({"guides": [{"type": "sketch", "image": "a.png"}]}, "guides.0"),
        ({"colour": "red"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_are_named(tmp_path, change, expected):
    items = frames(1)
    items[0].update(change)
    assert expected in _error(write_spec(tmp_path / "s.yaml", items))


def test_documented_spec_example_is_valid(tmp_path):
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "story.md").read_text(encoding="utf-8")
    blocks = [yaml.safe_load(block.split("```", 1)[0]) for block in text.split("```yaml\n")[1:]]
    data = next(block for block in blocks if isinstance(block, dict) and "frames" in block)  # the spec example
    data["frames"] = data["frames"] * 4  # the example shows two of the eight frames
    path = tmp_path / "story.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    spec = load_spec(path)
    assert spec.frame_count == 8 and spec.settings(2)[0] == 1152
