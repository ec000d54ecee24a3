"""The dashboard's Repair page: a mask from sliders or an upload, the inpaint and variation jobs, before/after, Undo.

A tiny 4-frame story (tests/test_story_search.py's fixture: the tiny Kolors at
64 px, 2 steps); real DiffSynth and Streamlit (AppTest) code, the jobs in
processes of their own as the dashboard runs them.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest
from test_story_search import base, manifest_of  # noqa: F401 (fixtures)

from kstory.app import repair_masks
from kstory.cli import jobs
from tests.app_pages import app_ok, open_page

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JOB_TIMEOUT = 300
FRAME = "2"  # a frame without a guide


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".jobs", ".lock.json"))
    return target


def _page(monkeypatch: pytest.MonkeyPatch, run: Path) -> AppTest:
    at = app_ok(open_page(monkeypatch, run, "Repair"))
    at.selectbox(key="repair_frame").set_value(FRAME).run()
    return _ok(at)


_ok = app_ok


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as handle:
        return np.asarray(handle.convert("RGB"), dtype=int)


def _finished(run: Path, label: str) -> dict:
    [job] = [j for j in jobs.list_jobs(run) if j["label"] == label]
    job = jobs.wait(run, job["id"], JOB_TIMEOUT)
    assert job["state"] == "done", (job, jobs.log_tail(run, job["id"], lines=40))
    return job


def _captions(at: AppTest) -> list[str]:
    return [caption for image in at.get("image") for caption in image.captions]


def test_a_slider_rectangle_is_inpainted_shown_before_and_after_and_undone(base, tmp_path, monkeypatch):  # noqa: F811
    run = _copy(base, tmp_path)
    frame = run / "story" / manifest_of(run)["frames"][FRAME]["file"]
    before = frame.read_bytes()
    at = _page(monkeypatch, run)
    for name, value in (("x", 8), ("y", 16), ("w", 24), ("h", 20)):
        at.slider(key=f"mask_{name}_{FRAME}").set_value(value).run()
    at.slider(key="inpaint_feather").set_value(2).run()
    assert any("of the frame), fading over the 2-pixel feather" in c for c in _captions(at)), _captions(at)
    at.checkbox(key="inpaint_random").uncheck().run()
    at.number_input(key=f"inpaint_seed_{FRAME}").set_value(7).run()
    at.button(key="inpaint_go").click().run()
    _ok(at)

    mask = np.asarray(Image.open(run / "masks" / "02-shape.png"))
    expected = np.zeros((64, 64), np.uint8)
    expected[16:36, 8:32] = 255  # x 8, width 24; y 16, height 20
    assert np.array_equal(mask, expected)
    _finished(run, f"Inpaint frame {FRAME}")

    record = manifest_of(run)["frames"][FRAME]
    (repair,) = record["repairs"]
    assert (repair["kind"], repair["seed"], repair["strength"], repair["feather"]) == ("inpaint", 7, 1.0, 2)
    assert np.array_equal(np.asarray(Image.open(run / "story" / repair["mask_file"])), expected)  # shipped copy
    old, new = np.asarray(Image.open(io.BytesIO(before)).convert("RGB"), dtype=int), _pixels(frame)
    assert np.abs(new[16:36, 8:32] - old[16:36, 8:32]).mean() > 5  # the region changed
    far = np.ones((64, 64), bool)
    far[16 - 3:36 + 3, 8 - 3:32 + 3] = False
    assert np.array_equal(new[far], old[far])  # beyond the feather, bit for bit the frame before

    at = _ok(at.run())  # the page after the job: before and after side by side
    assert any(f"Frame {FRAME}: its last repair" in h.value for h in at.subheader)
    assert {"before", "the region repainted", "after"} <= set(_captions(at)), _captions(at)
    at.button(key="repair_undo").click().run()
    _ok(at)
    assert frame.read_bytes() == before  # Undo: the previous picture, bit for bit
    undone = manifest_of(run)["frames"][FRAME]
    assert "repairs" not in undone and undone["seed_history"][-1]["undo"] == "inpaint"
    assert any(f"frame {FRAME} is back as it was before its last repair" in s.value for s in at.success)
    assert not any(f"Frame {FRAME}: its last repair" in h.value for h in at.subheader)
    stories = [p for p in (run / ".history").iterdir() if (p / "manifest.json").is_file()]
    repaired = [p for p in stories if json.loads((p / "manifest.json").read_text())["frames"][FRAME].get("repairs")]
    assert len(repaired) == 1  # the repaired story is kept in .history/


def test_an_uploaded_mask_of_another_size_is_resized_as_the_library_does(base, tmp_path, monkeypatch):  # noqa: F811
    run = _copy(base, tmp_path)
    at = _page(monkeypatch, run)
    at.radio(key="mask_source").set_value("a mask file").run()
    assert any("put one into the run as masks/02-upload.png" in i.value for i in _ok(at).info)
    big = np.zeros((128, 128), np.uint8)
    big[32:96, 64:128] = 200  # grey, twice the frame's size: the right half, rows 16-48 at frame size
    data = io.BytesIO()
    Image.fromarray(big).save(data, format="PNG")
    at.file_uploader(key=f"mask_upload_{FRAME}").set_value(("hand.png", data.getvalue(), "image/png")).run()
    assert not at.exception, [e.value for e in at.exception]
    assert (run / "masks" / "02-upload.png").read_bytes() == data.getvalue()  # kept as it came
    warnings = " ".join(w.value for w in at.warning)
    assert "the mask is 128x128, the frame 64x64: it is resized" in warnings and "not black and white" in warnings
    # the preview covers what the library repaints: the resized mask, a quarter of the frame (feather 0)
    at.slider(key="inpaint_feather").set_value(0).run()
    [shown] = [caption for caption in _captions(at) if "region to repaint" in caption]
    assert "(25% of the frame)" in shown
    at.slider(key="inpaint_strength").set_value(0.5).run()
    at.button(key="inpaint_go").click().run()
    _ok(at)
    _finished(run, f"Inpaint frame {FRAME}")
    (repair,) = manifest_of(run)["frames"][FRAME]["repairs"]
    stored = np.asarray(Image.open(run / "story" / repair["mask_file"]))
    expected = np.zeros((64, 64), np.uint8)
    expected[16:48, 32:64] = 255
    assert np.array_equal(stored, expected) and repair["threshold"] == 128 and repair["strength"] == 0.5


def test_a_variation_runs_as_a_job_and_keep_puts_the_comparison_away(base, tmp_path, monkeypatch):  # noqa: F811
    run = _copy(base, tmp_path)
    before = _pixels(run / "story" / "frames" / "02.png")
    at = _page(monkeypatch, run)
    at.slider(key="variation_strength").set_value(1.0).run()
    at.checkbox(key="variation_random").uncheck().run()
    at.number_input(key=f"variation_seed_{FRAME}").set_value(11).run()
    at.text_area(key=f"variation_prompt_{FRAME}").input("scene 1 at night").run()
    at.button(key="variation_go").click().run()
    _ok(at)
    job = _finished(run, f"Variation of frame {FRAME}")
    assert job["result"] == f"frame {FRAME}: img2img at strength 1 with seed 11"
    (repair,) = manifest_of(run)["frames"][FRAME]["repairs"]
    assert (repair["kind"], repair["seed"], repair["frame_prompt"]) == ("img2img", 11, "scene 1 at night")
    assert np.abs(_pixels(run / "story" / "frames" / "02.png") - before).mean() > 5
    at = _ok(at.run())
    assert {"before", "after"} <= set(_captions(at)) and "the region repainted" not in _captions(at)
    at.button(key="repair_keep").click().run()
    assert not any("its last repair" in h.value for h in _ok(at).subheader)
    assert manifest_of(run)["frames"][FRAME]["repairs"] == [repair]  # Keep changes nothing on disk


def test_shape_masks_and_the_preview(tmp_path):
    rectangle = repair_masks.shape_mask((64, 48), "rectangle", (60, 40, 10, 10))  # cut off at the frame's edge
    assert rectangle.pixels.sum() == 4 * 8 and rectangle.pixels[40:, 60:].all()
    ellipse = repair_masks.shape_mask((64, 64), "ellipse", (0, 0, 64, 64))
    assert ellipse.pixels[32, 32] and not ellipse.pixels[0, 0] and not ellipse.whole_frame
    with pytest.raises(Exception, match="lies outside the 64x64 frame"):
        repair_masks.shape_mask((64, 64), "rectangle", (70, 0, 4, 4))
    frame = Image.new("RGB", (64, 48), (0, 0, 255))
    tinted = np.asarray(repair_masks.preview(frame, rectangle, feather=3), dtype=int)
    assert tinted[45, 62, 0] > 100 and tuple(tinted[0, 0]) == (0, 0, 128)  # tinted on the mask, dimmed far off
    assert 0 < tinted[45, 58, 0] < tinted[45, 62, 0]  # the feathered edge: tinted, less
    assert repair_masks.enlarged(frame).size == (64 * 6, 48 * 6)
