"""A generated character sheet as the character reference: made first, used like an image, skipped when unchanged,
remade with the frames that use it, and made again by ``kstory verify`` from the package.

The tiny Kolors, a tiny random LoRA and the tiny random IP-Adapter-Plus on the CPU at 64 px, 2 steps, through
the real DiffSynth pipeline and transformers' CLIP.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.manifest import sha256_bytes
from kstory.story.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

FRAMES = [{"prompt": p, "seed": 20 + i} for i, p in enumerate(
    ["wakes up", "walks", "waves", "points", "runs", "sits", "thinks", "comes home"], start=1)]
USERS = [2, 3, 6]
SHEET = {"prompt": "character sheet, front view, plain background", "seed": 7}


def write_spec(path: Path, reference: dict | None) -> Path:
    character = {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"}
    if reference is not None:
        character["reference"] = {**reference, "adapter": "tiny", "frames": USERS, "scale": 1.0}
    spec = {"title": "sheet story", "frame_count": len(FRAMES), "character": character,
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0, "sampler": "euler"},
            "frames": FRAMES}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def manifest(story_dir: Path) -> dict:
    return json.loads((story_dir / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder (LoRA, story made with a character sheet) as `kstory package` expects it."""
    from test_submissions_package import write_quick_lora

    run = tmp_path_factory.mktemp("sheet") / "run"
    lora = write_quick_lora(run)
    story.generate_story(write_spec(run / "inputs" / "story.yaml", {"sheet": SHEET}), run / "story", model="tiny",
                         lora=lora)
    return run


def test_the_sheet_is_made_first_and_its_frames_use_it_exactly_as_an_image(run, tmp_path):
    made = manifest(run / "story")
    record = made["character_sheet"]
    sheet = run / "story" / "character-sheet.png"
    assert record["file"] == "character-sheet.png" and record["seed"] == 7 and record["steps"] == 2
    assert record["prompt"] == "kstory style, a fox, character sheet, front view, plain background"
    assert record["negative_prompt"] == "blurry" and record["sampler"] == "euler"
    assert record["sha256"] == sha256_bytes(sheet.read_bytes())
    assert pixels(sheet).shape == (64, 64, 3)
    for index in USERS:
        reference = made["frames"][str(index)]["ip_adapter"]["reference"]
        assert reference == {"sheet": record["key"], "file": "character-sheet.png", "sha256": record["sha256"]}
    assert all("ip_adapter" not in made["frames"][str(i)] for i in range(1, 9) if i not in USERS)

    lora = run / "lora" / "lora.safetensors"
    plain = story.generate_story(write_spec(tmp_path / "plain" / "story.yaml", None), tmp_path / "plain" / "out",
                                 model="tiny", lora=lora)
    (tmp_path / "image").mkdir()
    shutil.copyfile(sheet, tmp_path / "image" / "sheet.png")
    image = story.generate_story(write_spec(tmp_path / "image" / "story.yaml", {"image": "sheet.png"}),
                                 tmp_path / "image" / "out", model="tiny", lora=lora)
    for index in range(1, 9):
        ours = pixels(run / "story" / "frames" / f"{index:02d}.png")
        assert np.array_equal(ours, pixels(image.frames[index])), index  # the sheet is an image reference
        assert np.array_equal(ours, pixels(plain.frames[index])) == (index not in USERS), index


def test_an_unchanged_sheet_is_not_made_again_a_new_seed_remakes_it_and_its_frames_only(run, tmp_path):
    before = manifest(run / "story")
    again = story.generate_story(run / "inputs" / "story.yaml", run / "story", model="tiny",
                                 lora=run / "lora" / "lora.safetensors")
    assert again.generated == [] and manifest(run / "story") == before
    assert not (run / ".history").exists()  # nothing changed, nothing moved aside

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    spec, lora = copy / "inputs" / "story.yaml", copy / "lora" / "lora.safetensors"
    write_spec(spec, {"sheet": {**SHEET, "seed": 8}})
    result = story.generate_story(spec, copy / "story", model="tiny", lora=lora)
    after = manifest(copy / "story")
    assert result.generated == USERS
    new, old = after["character_sheet"], before["character_sheet"]
    assert new["seed"] == 8 and new["sha256"] != old["sha256"] and new["key"] != old["key"]
    assert [h["seed"] for h in new["history"]] == [7, 8]
    for index in range(1, 9):
        changed = after["frames"][str(index)]["sha256"] != before["frames"][str(index)]["sha256"]
        assert changed == (index in USERS), index
    assert after["frames"]["2"]["ip_adapter"]["reference"]["sha256"] == new["sha256"]
    (previous,) = (copy / ".history").iterdir()  # the story before, its sheet with it
    assert sha256_bytes((previous / "character-sheet.png").read_bytes()) == old["sha256"]

    rolled = story.reroll(copy / "story", 3, seed=FRAMES[2]["seed"])  # the sheet read back as the frame's file
    assert manifest(rolled.out_dir)["frames"]["3"]["sha256"] == after["frames"]["3"]["sha256"]
    assert manifest(rolled.out_dir)["frames"]["3"]["key"] == after["frames"]["3"]["key"]


def test_verify_makes_the_sheet_again_from_its_prompt_and_seed_then_the_frames(run, tmp_path):
    from test_submissions_package import SUFFIX, TEAM, score_story

    from kstory.submissions import build_package, verify_package

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    score_story(copy)
    package = build_package(copy, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    assert (package / "character-sheet.png").read_bytes() == (run / "story" / "character-sheet.png").read_bytes()
    report = verify_package(package, model="tiny", rescore=False)
    assert report.verdict == "identical", report.render()
    assert report.sheet is not None and report.sheet.identical
    assert report.sheet.regenerated_sha256 == manifest(run / "story")["character_sheet"]["sha256"]
    assert "character sheet character-sheet.png: identical" in report.render()


@pytest.mark.parametrize("reference, message", [
    ({"image": "fox.png", "sheet": SHEET}, r"line 7: character.reference: Value error, give exactly one of image, "
                                           r"frame, sheet \(got image, sheet\)"),
    ({"sheet": {**SHEET, "prompt": "  "}}, r"line 9: character.reference.sheet.prompt: .*the character sheet's "
                                           r"prompt is blank"),
    ({"sheet": {"prompt": "a fox"}}, r"character.reference.sheet.seed: Field required"),
    ({"sheet": {**SHEET, "steps": 0}}, r"character.reference.sheet.steps: Input should be greater than or equal to 1"),
])
def test_sheet_spec_errors_name_the_line(tmp_path, reference, message):
    with pytest.raises(KstoryError, match=message):
        load_spec(write_spec(tmp_path / "story.yaml", reference))
