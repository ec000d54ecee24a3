"""The dashboard's Character page: choose the character reference, per-frame use and scale, save to spec, regenerate.

A tiny run with a kstory.yaml whose story is 4 frames of the tiny Kolors at
64 px, 2 steps, one frame per batch, frame 1 the reference of the others
through the tiny IP-Adapter; real DiffSynth, transformers' CLIP and Streamlit
(AppTest) code, the regeneration a job in a process of its own.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from streamlit.testing.v1 import AppTest

from kstory.cli import jobs
from tests.app_pages import app_ok, open_page
from kstory.story.reference_edit import SETTING_KEYS, SOURCE_KEYS, ReferenceChoice, apply_choice
from kstory.story.spec import Reference, load_spec, reference_frames

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JOB_TIMEOUT = 300
HEADER = "# the fox story: kept when the dashboard saves\n"


def _spec(reference: dict) -> dict:
    frames = [{"prompt": f"scene {i}", "seed": 100 + i} for i in range(4)]
    return {"title": "character test", "frame_count": 4,
            "character": {"trigger_word": "ks", "description": "a fox", "reference": reference},
            "defaults": {"width": 64, "height": 64, "steps": 2}, "generation": {"batch_size": 1}, "frames": frames}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """runs/ref: kstory.yaml (story: inputs/story.yaml) and its story, made once by the config's story stage."""
    from kstory.cli.runner import run_config

    run = tmp_path_factory.mktemp("character") / "runs" / "ref"
    (run / "inputs" / "data").mkdir(parents=True)
    (run / "inputs" / "data" / "note.txt").write_text("the prep source; prep is never run here", encoding="utf-8")
    spec = HEADER + yaml.safe_dump(_spec({"frame": 1, "adapter": "tiny"}), sort_keys=False)
    (run / "inputs" / "story.yaml").write_text(spec, encoding="utf-8")
    config = {"name": "ref", "model": "tiny", "prep": {"source": "inputs/data"}, "story": {"spec": "inputs/story.yaml"}}
    (run / "kstory.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    outcomes = {o.stage: o.status for o in run_config(run / "kstory.yaml", until="story", only={"story"})}
    assert outcomes["story"] == "ran"
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".jobs", ".lock.json"))
    return target


_ok = app_ok


def _page(monkeypatch: pytest.MonkeyPatch, run: Path) -> AppTest:
    return app_ok(open_page(monkeypatch, run, "Character"))


def _png(seed: int) -> bytes:
    data = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40, 3), dtype=np.uint8)).save(data, "PNG")
    return data.getvalue()


def _spec_text(run: Path) -> str:
    return (run / "inputs" / "story.yaml").read_text(encoding="utf-8")


def _kept_specs(run: Path) -> list[Path]:
    history = run / ".history"
    return sorted(history.glob("story.yaml-*")) if history.is_dir() else []


def _hashes(run: Path) -> dict[str, str]:
    manifest = json.loads((run / "story" / "manifest.json").read_text(encoding="utf-8"))
    return {key: frame["sha256"] for key, frame in manifest["frames"].items()}


def test_the_source_fields_and_settings_are_every_field_of_the_reference():
    """A new field of character.reference must be named a source or a setting (the page keeps settings as they are)."""
    assert set(SOURCE_KEYS) | set(SETTING_KEYS) == set(Reference.model_fields)


def test_a_choice_replaces_the_source_and_keeps_the_other_settings():
    data = _spec({"image": "fox.png", "adapter": "tiny", "start": 0.1, "end": 0.9})
    data["frames"][1]["reference_scale"] = 1.5
    changed = apply_choice(data, ReferenceChoice({"frame": 1}, {2: None, 3: 0.3 + 0.15}, scale=0.7))
    assert list(changed["character"]["reference"].items()) == [
        ("frame", 1), ("adapter", "tiny"), ("frames", [2, 3]), ("scale", 0.7), ("start", 0.1), ("end", 0.9)]
    assert [frame.get("reference_scale") for frame in changed["frames"]] == [None, None, 0.45, None]
    assert data["frames"][1]["reference_scale"] == 1.5  # the caller's data is left as it was
    every = apply_choice(data, ReferenceChoice({"frame": 2}, {1: None, 3: None, 4: None}))
    assert every["character"]["reference"] == {"frame": 2, "adapter": "tiny", "start": 0.1, "end": 0.9}
    with pytest.raises(ValueError, match="exactly one source"):
        ReferenceChoice({"image": "fox.png", "frame": 1})


def test_an_uploaded_reference_is_stored_in_the_run_and_saved_to_the_spec(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    before = _spec_text(run)
    at = _page(monkeypatch, run)
    assert any("the reference: frame 1" in c for image in at.get("image") for c in image.captions)
    assert any("2 at 0.5, 3 at 0.5, 4 at 0.5" in m.value for m in at.markdown)
    at.radio(key="char_source").set_value("image").run()
    assert any("upload a picture" in i.value for i in _ok(at).info)
    fox = _png(1)
    at.file_uploader(key="char_upload").set_value(("my fox!.png", fox, "image/png")).run()
    assert (run / "references" / "my-fox.png").read_bytes() == fox  # kept as it came, under a clean name
    assert _ok(at).selectbox(key="char_image").value == "../references/my-fox.png"
    at.button(key="char_save").click().run()
    assert any("the previous spec is kept as .history/story.yaml-" in s.value for s in _ok(at).success)

    text = _spec_text(run)
    assert text.startswith(HEADER)
    saved = yaml.safe_load(text)
    assert saved["character"]["reference"] == {"image": "../references/my-fox.png", "adapter": "tiny",
                                               "frames": [2, 3, 4]}
    assert saved["frames"] == yaml.safe_load(before)["frames"] and saved["title"] == "character test"
    [kept] = _kept_specs(run)
    assert kept.read_text(encoding="utf-8") == before
    assert reference_frames(load_spec(run / "inputs" / "story.yaml")) == {2: 0.5, 3: 0.5, 4: 0.5}
    assert any("the reference: ../references/my-fox.png" in c for image in at.get("image") for c in image.captions)

    # another picture of the same name never replaces the stored one; a broken one is refused, nothing stored
    at.file_uploader(key="char_upload").set_value(("my fox!.png", _png(2), "image/png")).run()
    assert (run / "references" / "my-fox.png").read_bytes() == fox
    assert (run / "references" / "my-fox-2.png").read_bytes() == _png(2)
    assert _ok(at).selectbox(key="char_image").value == "../references/my-fox-2.png"
    at.file_uploader(key="char_upload").set_value(("cat.png", b"\x89PNG not really", "image/png")).run()
    assert any("the upload 'cat.png' is not a readable picture" in e.value for e in at.error)
    assert sorted(p.name for p in (run / "references").iterdir()) == ["my-fox-2.png", "my-fox.png"]


def test_a_frame_toggled_off_and_a_new_scale_are_saved_and_regenerated_alone(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    before = _hashes(run)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job's process: one thread is fastest for 64 px frames
    at = _page(monkeypatch, run)
    at.checkbox(key="char_use_3").uncheck().run()
    at.number_input(key="char_scale_4").set_value(0.8).run()
    at.button(key="char_save").click().run()
    _ok(at)
    saved = yaml.safe_load(_spec_text(run))
    assert saved["character"]["reference"] == {"frame": 1, "adapter": "tiny", "frames": [2, 4]}
    assert [frame.get("reference_scale") for frame in saved["frames"]] == [None, None, None, 0.8]
    assert reference_frames(load_spec(run / "inputs" / "story.yaml")) == {2: 0.5, 4: 0.8}
    assert len(_kept_specs(run)) == 1
    assert any("frame(s) 3, 4: Regenerate" in i.value for i in at.info)
    at.button(key="char_save").click().run()  # the same choice again: nothing written
    assert any("nothing written" in i.value for i in _ok(at).info) and len(_kept_specs(run)) == 1

    at.button(key="char_regenerate").click().run()
    _ok(at)
    [job] = [j for j in jobs.list_jobs(run) if j["label"] == "Regenerate the story"]
    job = jobs.wait(run, job["id"], JOB_TIMEOUT)
    assert job["state"] == "done", (job, jobs.log_tail(run, job["id"], lines=40))
    assert job["result"] == "frames 3, 4 made again"
    after = _hashes(run)
    assert {k for k in after if after[k] != before[k]} == {"3", "4"}  # frames 1 and 2: the same files
    frames = json.loads((run / "story" / "manifest.json").read_text(encoding="utf-8"))["frames"]
    assert "ip_adapter" not in frames["3"] and frames["4"]["ip_adapter"]["scale"] == 0.8
    assert frames["2"]["ip_adapter"]["scale"] == 0.5
    at = _ok(at.run())
    assert not any("Regenerate makes them again" in i.value for i in at.info)


def test_the_reference_frame_using_itself_shows_the_specs_error_and_writes_nothing(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    before = _spec_text(run)
    at = _page(monkeypatch, run)
    at.selectbox(key="char_frame").set_value(2).run()  # frame 2's "uses the reference" is still ticked
    at.button(key="char_save").click().run()
    assert not at.exception
    [error] = at.error
    assert "the changed spec was not saved" in error.value
    assert "frame 2 is the character reference and cannot use itself" in error.value
    assert _spec_text(run) == before and not _kept_specs(run)


def test_a_generated_sheet_is_saved_with_its_prompt_and_seed(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    at = _page(monkeypatch, run)
    at.radio(key="char_source").set_value("sheet").run()
    assert any("made first when the story is regenerated" in c.value for c in _ok(at).caption)
    at.text_input(key="char_sheet_prompt").set_value("character sheet, front view").run()
    at.number_input(key="char_sheet_seed").set_value(4242).run()
    at.button(key="char_save").click().run()
    reference = yaml.safe_load(_spec_text(_ok(at) and run))["character"]["reference"]
    assert reference["sheet"] == {"prompt": "character sheet, front view", "seed": 4242}
    assert "frame" not in reference and "image" not in reference and len(_kept_specs(run)) == 1


def test_without_an_ip_adapter_the_page_says_how_to_configure_one(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    (run / "inputs" / "story.yaml").write_text(yaml.safe_dump(_spec({"frame": 1})), encoding="utf-8")
    at = _page(monkeypatch, run)
    assert any("character.reference.adapter is not set" in w.value for w in at.warning)
    assert any("adapter: models/Kolors-IP-Adapter-Plus" in c.value for c in at.code)
    assert any("--ip-adapter PATH" in m.value for m in at.markdown)
    # no reference controls that could not run; consistent attention needs no adapter and stays
    assert [b.key for b in at.button] == ["char_share_save", "char_regenerate"]
    assert [c.key for c in at.checkbox] == ["char_share_on"]


def test_consistent_attention_is_switched_per_frame_and_off(base, tmp_path, monkeypatch):
    run = _copy(base, tmp_path)
    at = _page(monkeypatch, run)
    assert not at.checkbox(key="char_share_on").value  # the base story shares no attention
    at.checkbox(key="char_share_on").check().run()
    at.multiselect(key="char_share_identity").set_value([1]).run()
    at.multiselect(key="char_share_readers").set_value([3]).run()
    at.button(key="char_share_save").click().run()
    section = yaml.safe_load(_spec_text(_ok(at) and run))["generation"]["consistent_attention"]
    assert section == {"identity_frames": [1], "frames": [1, 3]}
    assert load_spec(run / "inputs" / "story.yaml").generation.consistent_attention.frames == [1, 3]
    at = _page(monkeypatch, run)
    assert at.checkbox(key="char_share_on").value and at.multiselect(key="char_share_readers").value == [3]
    at.checkbox(key="char_share_on").uncheck().run()
    at.button(key="char_share_save").click().run()
    assert "consistent_attention" not in (yaml.safe_load(_spec_text(_ok(at) and run)).get("generation") or {})
    assert len(_kept_specs(run)) == 2


def test_regenerate_refuses_while_prep_or_train_is_out_of_date(base, tmp_path):
    """The dashboard never runs upstream stages: a story stamped with a LoRA that is not the config's is refused."""
    from kstory.app.actions import regenerate_story
    from kstory.core.errors import KstoryError
    from kstory.core.rundir import write_stamp

    run = _copy(base, tmp_path)
    before = _hashes(run)
    (run / "lora").mkdir()
    write_stamp(run / "lora", "train", "another fingerprint")
    with pytest.raises(KstoryError, match="not regenerated here: train is out of date"):
        regenerate_story(run)
    assert _hashes(run) == before
