"""Repairs of one frame (img2img variation, masked inpainting) on the tiny Kolors at 64 px, 4 Euler steps."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.repair import Repair
from kstory.story.repair_frame import repair_frame

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FEATHER = 4


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("repair")
    spec = {"title": "t", "frame_count": 2, "character": {"trigger_word": "kstory style", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0, "sampler": "euler"},
            "frames": [{"prompt": "a fox", "seed": 1}, {"prompt": "a cat", "seed": 2}]}
    (root / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    story.generate_story(root / "story.yaml", root / "story", model="tiny")
    return root / "story"


@pytest.fixture
def out(made, tmp_path) -> Path:
    shutil.copytree(made, tmp_path / "story")
    return tmp_path / "story"


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=int)


def write_mask(path: Path, box=(16, 16, 40, 32), size=(64, 64), value=255) -> Path:
    mask = np.zeros(size[::-1], np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = value
    Image.fromarray(mask).save(path)
    return path


def far_from(box, margin, size=64) -> np.ndarray:
    """Pixels more than ``margin`` away from ``box`` (left, top, right, bottom)."""
    keep = np.ones((size, size), bool)
    keep[max(box[1] - margin, 0):box[3] + margin, max(box[0] - margin, 0):box[2] + margin] = False
    return keep


@pytest.mark.parametrize("crop", [None, 4])
def test_inpaint_keeps_pixels_outside_the_mask_and_changes_inside(out, tmp_path, crop):
    before = pixels(out / "frames/01.png")
    result = repair_frame(out, 1, kind="inpaint", strength=1.0, seed=5, mask=write_mask(tmp_path / "m.png"),
                          feather=FEATHER, crop_padding=crop)
    after = pixels(result.frames[1])
    outside = far_from((16, 16, 40, 32), FEATHER + 1)
    assert np.array_equal(after[outside], before[outside])  # tolerance 0 beyond the feathered edge
    assert np.abs(after[16:32, 16:40] - before[16:32, 16:40]).mean() > 10
    assert pixels(out / "frames/02.png").tolist() == pixels(out.parent / "story/frames/02.png").tolist()
    record = json.loads((out / "manifest.json").read_text())["frames"]["1"]
    (repair,) = record["repairs"]
    assert repair["kind"] == "inpaint" and repair["seed"] == 5 and repair["sampler"] == "euler"
    assert repair["crop_padding"] == crop and repair["mask_file"] == "repairs/01-1-mask.png"
    assert repair["sha256"] == record["sha256"] and record["key"] != record["base_key"]
    assert record["seed_history"][-1]["repair"] == "inpaint"
    assert list((out.parent / ".history").iterdir())  # the story before the repair is kept


def test_repaired_frame_regenerates_bit_identically_and_full_runs_keep_it(out, tmp_path):
    repair_frame(out, 1, kind="inpaint", strength=0.8, seed=9, mask=write_mask(tmp_path / "m.png"), feather=2)
    repair_frame(out, 1, kind="img2img", strength=0.5, seed=3, prompt="a red fox")
    manifest = json.loads((out / "manifest.json").read_text())
    record = manifest["frames"]["1"]
    assert [r["kind"] for r in record["repairs"]] == ["inpaint", "img2img"]
    assert record["repairs"][1]["prompt"] == "kstory style, a red fox"
    # what `kstory verify` does: the spec regenerated elsewhere, the recorded repairs replayed from their files
    repairs = {1: [Repair.from_record(r, out) for r in record["repairs"]]}
    again = story.generate_story(out / "story.yaml", tmp_path / "regen", model="tiny", repairs=repairs)
    assert again.frame_hashes == {int(k): f["sha256"] for k, f in manifest["frames"].items()}
    # a full run on the story folder keeps the repaired frame (its generation is unchanged)
    kept = story.generate_story(out / "story.yaml", out, model="tiny")
    assert kept.generated == [] and kept.frame_hashes[1] == record["sha256"]


def test_img2img_at_strength_towards_zero_returns_the_source(out):
    before = (out / "frames/02.png").read_bytes()
    tiny = repair_frame(out, 2, kind="img2img", strength=0.2, seed=4)  # int(4 * 0.2) = 0 steps of 4 to run
    assert tiny.frames[2].read_bytes() == before
    source = pixels(tiny.frames[2])
    full = repair_frame(out, 2, kind="img2img", strength=1.0, seed=4)
    assert np.abs(pixels(full.frames[2]) - source).mean() > 5


def test_img2img_from_another_picture_is_stored_and_recorded(out, tmp_path):
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    repair_frame(out, 2, kind="img2img", strength=0.5, seed=4, from_image=tmp_path / "red.png")
    (repair,) = json.loads((out / "manifest.json").read_text())["frames"]["2"]["repairs"]
    assert repair["source_file"] == "repairs/02-1-source.png" and (out / repair["source_file"]).is_file()
    assert Image.open(out / repair["source_file"]).size == (64, 64)


def test_bad_masks_and_arguments(out, tmp_path, caplog):
    with pytest.raises(KstoryError, match="the mask is empty"):
        repair_frame(out, 1, kind="inpaint", strength=1.0, seed=1, mask=write_mask(tmp_path / "e.png", value=0))
    with pytest.raises(KstoryError, match="frame 3 is not in this story"):
        repair_frame(out, 3, kind="inpaint", strength=1.0, mask=write_mask(tmp_path / "m.png"))
    for strength in (0.0, 1.5):
        with pytest.raises(KstoryError, match=r"outside \(0, 1\]"):
            repair_frame(out, 1, kind="img2img", strength=strength)
    with caplog.at_level(logging.WARNING):
        repair_frame(out, 1, kind="inpaint", strength=1.0, seed=1, feather=0,
                     mask=write_mask(tmp_path / "big.png", box=(32, 32, 80, 64), size=(128, 128), value=200))
    assert "resized to the frame" in caplog.text and "not black and white" in caplog.text
    (repair,) = json.loads((out / "manifest.json").read_text())["frames"]["1"]["repairs"]
    assert repair["threshold"] == 128 and not repair["whole_frame"]
    assert np.asarray(Image.open(out / repair["mask_file"])).tolist() == \
        np.asarray(Image.open(write_mask(tmp_path / "small.png", box=(16, 16, 40, 32)))).tolist()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        repair_frame(out, 2, kind="inpaint", strength=1.0, seed=1, mask=write_mask(tmp_path / "w.png", box=(0, 0, 64, 64)))
    assert "covers the whole frame: this is a full re-roll" in caplog.text
    assert json.loads((out / "manifest.json").read_text())["frames"]["2"]["repairs"][0]["whole_frame"]


def test_undo_puts_the_frame_before_its_last_repair_back_and_keeps_the_history(out, tmp_path):
    from kstory.story.undo_repair import before_last_repair, undo_last_repair

    with pytest.raises(KstoryError, match="no repair"):
        undo_last_repair(out, 1)
    first = (out / "frames/01.png").read_bytes()
    repair_frame(out, 1, kind="img2img", strength=0.5, seed=3)
    second = (out / "frames/01.png").read_bytes()
    repair_frame(out, 1, kind="inpaint", strength=1.0, seed=4, mask=write_mask(tmp_path / "m.png"))
    assert before_last_repair(out, 1)[1]["sha256"] == json.loads((out / "manifest.json").read_text())[
        "frames"]["1"]["repairs"][-1]["source_sha256"]
    other = (out / "frames/02.png").read_bytes()
    histories = len(list((out.parent / ".history").iterdir()))
    undo_last_repair(out, 1)
    assert (out / "frames/01.png").read_bytes() == second and (out / "frames/02.png").read_bytes() == other
    record = json.loads((out / "manifest.json").read_text())["frames"]["1"]
    assert [r["kind"] for r in record["repairs"]] == ["img2img"]
    assert record["seed_history"][-1]["undo"] == "inpaint" and len(record["seed_history"]) == 4
    assert len(list((out.parent / ".history").iterdir())) == histories + 1  # the repaired story is kept too
    undo_last_repair(out, 1)
    assert (out / "frames/01.png").read_bytes() == first
    assert "repairs" not in json.loads((out / "manifest.json").read_text())["frames"]["1"]
    # the story is consistent: a full run finds it up to date, and its spec copy agrees with the manifest
    assert story.generate_story(out / "story.yaml", out, model="tiny").generated == []
