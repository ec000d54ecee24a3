"""The dashboard (app/) on one demo run, through Streamlit's AppTest: every page, every action, bad input."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

import pytest

import kstory  # noqa: F401
from kstory.core.errors import KstoryError

from streamlit.testing.v1 import AppTest

from kstory.story import review

from kstory.core import run_access
from kstory.cli.launch import RUN_ENV, RUNS_ROOT_ENV

MAIN = str(Path(__file__).resolve().parent.parent / "kstory" / "app" / "main.py")
TIMEOUT = 240
JOB_TIMEOUT = 300



def _app(monkeypatch: pytest.MonkeyPatch, runs_root: Path, run: str | None = "demo") -> AppTest:
    monkeypatch.setenv(RUNS_ROOT_ENV, str(runs_root))
    if run is None:
        monkeypatch.delenv(RUN_ENV, raising=False)
    else:
        monkeypatch.setenv(RUN_ENV, run)
    return AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()


def _goto(at: AppTest, page: str) -> AppTest:
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def _texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "error", "warning", "success", "info", "code")
             for e in at.get(kind)]
    return "\n".join(str(p) for p in parts)


def _images(at: AppTest) -> int:
    return len(at.get("image"))


# --- pure helpers -------------------------------------------------------------------------------------------

def test_app_takes_a_run_path_or_a_run_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kstory.cli.launch import environment, locate_run

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "elsewhere" / "other").mkdir(parents=True)
    run, root = locate_run("runs/mine", None)  # as the README prints it: not runs/runs/mine
    assert run == (tmp_path / "runs" / "mine").resolve() and environment(run, root)[RUN_ENV] == "mine"
    (tmp_path / "mine").mkdir()  # a same-named folder in the working directory does not shadow the run
    run, root = locate_run("mine", None)
    assert run == (tmp_path / "runs" / "mine").resolve() and environment(run, root)[RUN_ENV] == "mine"
    run, root = locate_run("elsewhere/other", None)  # outside runs/: opens in its own parent
    assert root == (tmp_path / "elsewhere").resolve() and environment(run, root)[RUN_ENV] == "other"
    with pytest.raises(KstoryError, match="outside the runs root"):
        environment(*locate_run("elsewhere/other", Path("runs")))


def test_streamlit_config_keeps_a_plain_streamlit_run_local() -> None:
    try:
        import tomllib
    except ImportError:  # Python 3.10: pytest's own dependency
        import tomli as tomllib

    config = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text(encoding="utf-8"))
    assert config["server"]["address"] == "127.0.0.1" and config["server"]["headless"] is True
    assert config["browser"]["gatherUsageStats"] is False
    from kstory.cli.launch import command

    line = command()  # `kstory app` passes them itself, so they hold when started from any folder
    assert line[line.index("--server.address") + 1] == "127.0.0.1"
    assert line[line.index("--browser.gatherUsageStats") + 1] == "false"


def test_dropped_samples_outside_the_runs_root_are_shown_read_only(tmp_path: Path) -> None:
    from kstory.app.pages_data import _dataset_folder, _image_of
    from kstory.core.rundir import RunDir

    dataset = tmp_path / "my_images"
    dataset.mkdir()
    (dataset / "a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"png")
    run = RunDir(tmp_path / "runs" / "mine")
    report = {"source": str(dataset)}
    dropped = {"status": "dropped", "stage": "juicer", "source": str(dataset / "a.png")}
    assert _image_of(run, dropped, _dataset_folder(report)) == (dataset / "a.png").resolve()
    assert _image_of(run, dropped) is None  # without the report's dataset folder, nothing outside the run
    stray = dict(dropped, source=str(tmp_path / "secret.png"))
    assert _image_of(run, stray, _dataset_folder(report)) is None
    assert _dataset_folder({"source": "modelscope://a/b"}) is None


def test_paths_cannot_escape_the_runs_root(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    (root / "ok").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert run_access.resolve_run(root, "ok") == (root / "ok").resolve()
    assert run_access.resolve_run(root, str(root / "ok")) == (root / "ok").resolve()
    for bad in ("..", "../outside", "ok/../../outside", str(tmp_path / "outside"), "/etc", "link", "", ".", "a\x00b"):
        with pytest.raises(KstoryError):
            run_access.resolve_run(root, bad)
    for bad in ("../x", "a/b", ".hidden", "", "x" * 80):
        with pytest.raises(KstoryError):
            run_access.new_run_name(bad)
    assert run_access.inside(root, "../outside") is None
    assert run_access.inside(root, "ok") == (root / "ok").resolve()


def test_review_file_round_trip(tmp_path: Path) -> None:
    story = tmp_path / "story"
    with pytest.raises(KstoryError):
        review.save(story, review.Review())
    story.mkdir()
    keys = [str(i) for i in range(1, 9)]
    state = review.load(story)
    assert state.ordered(keys) == keys and not state.locked
    state.move(keys, "3", -1)
    state.locked.add("5")
    review.save(story, state)
    again = review.load(story)
    assert again.ordered(keys)[:3] == ["1", "3", "2"] and again.locked == {"5"}
    assert json.loads((story / review.FILE).read_text())["format"] == review.FORMAT
    (story / review.FILE).write_text("{not json")
    assert review.load(story).ordered(keys) == keys


# --- pages on the demo run ----------------------------------------------------------------------------------

def test_every_page_loads_on_the_demo_run(demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _app(monkeypatch, demo_runs)
    assert not at.exception
    assert "demo" in _texts(at) or at.selectbox(key="run_pick").value == "demo"
    _goto(at, "Data")
    assert [m.value for m in at.metric] == ["37", "24", "13"] or len(at.metric) == 3
    assert "dropped by image_aspect_ratio_filter" in _texts(at)
    assert _images(at) > 10
    _goto(at, "Training")
    assert at.selectbox(key="checkpoint").options == ["step-000006", "step-000012"]
    at.selectbox(key="checkpoint").set_value("step-000012").run()
    assert _images(at) == 2
    _goto(at, "Story")
    assert _images(at) >= 8
    text = _texts(at)
    assert text.count("aesthetic **") == 8 and "identity (CLIP-I to the others)" in text
    assert "consistent attention: reads the bank (tokens of frames 1, 2" in text  # the demo's frames 3 and 4
    assert "pulls the mean below the gate" in text  # the tiny demo's gate fails
    _goto(at, "Character")  # the demo's drawn reference for frames 2 and 3, frame 5 at its own scale
    assert "**Frames that use it:** 2 at 0.5, 3 at 0.5, 5 at 0.8" in _texts(at)
    assert at.checkbox(key="char_use_5").value and at.number_input(key="char_scale_5").value == 0.8
    assert not at.checkbox(key="char_use_4").value and at.selectbox(key="char_image").value == "story-character.png"
    assert "Regenerate makes them again" not in _texts(at)  # the story was made with these settings
    _goto(at, "Package")
    assert "naming rule" in _texts(at)


def test_data_filter_by_op(demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _goto(_app(monkeypatch, demo_runs), "Data")
    at.multiselect(key="data_ops").set_value(["image_deduplicator"]).run()
    text = _texts(at)
    assert "dropped by image_deduplicator" in text and "dropped by image_aspect_ratio_filter" not in text
    assert any("Dropped (2)" in h.value for h in at.subheader)


def test_training_pick_checkpoint(demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    at = _goto(_app(monkeypatch, demo_runs), "Training")
    at.selectbox(key="checkpoint").set_value("step-000006").run()
    at.button(key="pick_checkpoint").click().run()
    assert not at.exception
    story = demo_runs / "demo" / "story"
    try:
        assert review.load(story).checkpoint == "step-000006"
        assert any("picked step-000006" in s.value for s in at.success)
        # the pick is not the story's LoRA until the story stage runs again, and the Story page says so
        at = _goto(_app(monkeypatch, demo_runs), "Story")
        assert any("checkpoint step-000006 is picked" in i.value for i in at.info), _texts(at)
    finally:
        review.drop_checkpoint(story)  # the shared demo run's story stays up to date for the tests after this one


def test_training_deleted_pick_and_final_lora(demo_runs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "runs"
    shutil.copytree(demo_runs / "demo", root / "demo", ignore=shutil.ignore_patterns(".history", ".jobs", "submission"))
    step = sorted(p.name for p in (root / "demo" / "lora" / "checkpoints").iterdir())[0]
    review.save(root / "demo" / "story", review.Review(checkpoint=step))
    shutil.rmtree(root / "demo" / "lora" / "checkpoints" / step)
    at = _goto(_app(monkeypatch, root), "Training")
    assert any(f"picked checkpoint {step} has no LoRA" in e.value for e in at.error)
    at.button(key="use_final_lora").click().run()
    assert not at.exception and not at.error
    assert review.load(root / "demo" / "story").checkpoint is None
    assert any("pick cleared" in s.value for s in at.success)


def test_story_lock_and_reorder(demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    story = demo_runs / "demo" / "story"
    at = _goto(_app(monkeypatch, demo_runs), "Story")
    at.button(key="down_1").click().run()
    at.button(key="lock_2").click().run()
    assert not at.exception
    state = review.load(story)
    assert state.ordered([str(i) for i in range(1, 9)])[:2] == ["2", "1"] and state.locked == {"2"}
    assert "2" not in at.selectbox(key="reroll_frame").options
    at.button(key="reset_order").click().run()
    at.button(key="lock_2").click().run()
    state = review.load(story)
    assert state.order == [] and not state.locked


def _job_of(run: Path, label: str) -> dict:
    """The newest job of the run with that label start, waited for until it finishes."""
    from kstory.cli import jobs

    job = next(j for j in jobs.list_jobs(run) if j["label"].startswith(label))
    return jobs.wait(run, job["id"], JOB_TIMEOUT)


def test_story_reroll_runs_as_a_job_that_a_reload_finds(demo_runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = demo_runs / "demo"
    before = json.loads((run / "story" / "manifest.json").read_text())["frames"]["6"]
    at = _goto(_app(monkeypatch, demo_runs), "Story")
    at.selectbox(key="reroll_frame").set_value("6").run()
    at.checkbox(key="reroll_random").uncheck().run()
    at.number_input(key="reroll_seed_6").set_value(4242).run()
    at.button(key="reroll_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = _job_of(run, "Re-roll frame 6")
    assert job["state"] == "done", job
    assert job["pid"] != os.getpid() and job["progress"]["fraction"] == 1.0
    # A reload (a new session) finds the job and its result in the run's files.
    again = _goto(_app(monkeypatch, demo_runs), "Story")
    assert any("Re-roll frame 6 and score the story: done" in s.value for s in again.success), _texts(again)
    after = json.loads((run / "story" / "manifest.json").read_text())["frames"]["6"]
    assert after["seed"] == 4242 and [h["seed"] for h in after["seed_history"]][-1] == 4242
    assert before["seed"] in [h["seed"] for h in after["seed_history"]]
    scores = json.loads((run / "scores.json").read_text())
    frame6 = next(i for i in scores["images"] if Path(i["file"]).name == "06.png")
    assert frame6["sha256"] == after["sha256"]
    assert "seed **4242**" in _texts(again)
    # The re-roll is part of the story's state: a later `kstory run` keeps it and has nothing left to do.
    from kstory.cli.runner import run_config

    outcomes = {o.stage: o.status for o in run_config(run / "kstory.yaml")}
    assert outcomes == {"prep": "skipped", "train": "skipped", "story": "skipped", "score": "skipped",
                        "package": "not configured", "upload": "not configured"}, outcomes
    assert json.loads((run / "story" / "manifest.json").read_text())["frames"]["6"]["seed"] == 4242


def test_package_name_build_preview_and_upload(demo_runs: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    from hub_standin import StandInHub

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MODELSCOPE_HOME", str(tmp_path / "home" / ".modelscope"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "home" / "ms-cache"))
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    run = demo_runs / "demo"
    at = _goto(_app(monkeypatch, demo_runs), "Package")
    at.text_input(key="pkg_team").input("bad team!").run()
    at.text_input(key="pkg_suffix").input("fox").run()
    assert any("breaks the naming rule" in e.value for e in at.error)
    assert at.button(key="pkg_build").disabled
    at.text_input(key="pkg_team").input("kteam").run()
    assert any("kteam-可图Kolors训练-fox" in s.value for s in at.success)
    at.text_area(key="pkg_description").input("A fox in a scarf.").run()
    at.button(key="pkg_build").click().run()  # tiny random-weight models: a test artefact, refused unless ticked
    assert _job_of(run, "Build the package")["state"] == "failed"
    at.run()
    assert any("test artefact" in e.value for e in at.error), _texts(at)
    at.checkbox(key="pkg_allow_test").check().run()
    at.button(key="pkg_build").click().run()  # the tiny gate fails: the job fails with the message
    assert _job_of(run, "Build the package")["state"] == "failed"
    at.run()
    assert any("gate did not pass" in e.value for e in at.error), _texts(at)
    at.checkbox(key="pkg_allow_failed").check().run()
    at.button(key="pkg_build").click().run()
    assert not at.exception
    assert _job_of(run, "Build the package")["state"] == "done"
    at.run()
    assert (run / "submission" / "README.md").is_file()
    assert any("Build the package" in s.value and "submission" in s.value for s in at.success), _texts(at)
    assert any("data:image/png;base64," in m.value for m in at.markdown)  # the card's frames, inlined
    assert "A fox in a scarf." in _texts(at)

    token = "ms-" + secrets.token_hex(16)
    assert any("TEST ARTEFACT" in w.value for w in at.warning)  # said before any upload is tried
    at.text_input(key="upload_owner").input("alice")
    at.checkbox(key="upload_dry").uncheck()
    at.checkbox(key="upload_allow_test").check()
    at.checkbox(key="upload_allow_gate").check()
    with StandInHub(token) as hub:
        at.text_input(key="upload_endpoint").input(hub.endpoint)
        at.text_input(key="upload_token").input(token)
        at.button(key="FormSubmitter:upload-Upload").click().run()
        assert not at.exception
        job = _job_of(run, "Upload to alice/")
        assert job["state"] == "done", job
        assert f"alice/kteam-可图Kolors训练-fox" in hub.repos
    at.run()
    assert any("uploaded" in str(c.value) for c in at.get("code")), _texts(at)
    assert at.text_input(key="upload_token").value == ""
    assert token not in _texts(at) and token not in repr(at.session_state)
    log = (run / "kstory.log")
    assert not log.exists() or token not in log.read_text(encoding="utf-8", errors="replace")
    for name in ("job.json", "log.txt"):  # the job got the token through its environment only
        assert token not in (run / ".jobs" / job["id"] / name).read_text(encoding="utf-8", errors="replace")


# --- bad input ----------------------------------------------------------------------------------------------

def test_missing_and_corrupt_files_are_reported(demo_runs: Path, monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    root = tmp_path / "runs"
    broken = root / "broken"
    shutil.copytree(demo_runs / "demo" / "story", broken / "story")
    (broken / "data").mkdir()
    (broken / "data" / "report.json").write_text("{truncated", encoding="utf-8")
    (broken / "scores.json").write_text("[]", encoding="utf-8")
    (broken / "story" / "frames" / "03.png").write_bytes(b"not a png")
    (broken / "story" / "frames" / "04.png").unlink()
    at = _app(monkeypatch, root, "broken")
    assert not at.exception
    assert any("missing: lora/loss.csv" in m.value for m in at.markdown)
    _goto(at, "Data")
    assert any("unreadable" in w.value for w in at.warning)
    _goto(at, "Training")
    assert any("no lora/ folder" in w.value for w in at.warning)
    _goto(at, "Story")
    text = _texts(at)
    assert "not a JSON object" in text and "no preview: 03.png" in text and "no preview: 04.png" in text
    _goto(at, "Package")
    assert "no package yet" in _texts(at)


def test_typed_paths_cannot_escape(demo_runs: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    at = _app(monkeypatch, demo_runs, run="../../etc")
    assert not at.exception and any("outside the runs root" in e.value for e in at.error)
    at.text_input(key="run_typed").input("../" + demo_runs.name + "/../..").run()
    at.button(key="run_open").click().run()
    assert any("outside the runs root" in e.value for e in at.error)
    at.text_input(key="new_run_name").input("../evil")
    at.button(key="FormSubmitter:new_run-Create run").click().run()
    assert any("not a valid run name" in e.value for e in at.error)
    assert not (demo_runs.parent / "evil").exists()
    at.text_input(key="new_run_name").input("fresh")
    at.button(key="FormSubmitter:new_run-Create run").click().run()
    assert (demo_runs / "fresh" / "kstory.yaml").is_file()
    assert at.session_state["run"] == "fresh"
    # The starter config runs as written: the loader accepts it and `kstory run` gets through prep.
    from kstory.core.config import load_config
    from kstory.cli.runner import run_config

    config = load_config(demo_runs / "fresh" / "kstory.yaml")
    assert config.run_dir.resolve() == (demo_runs / "fresh").resolve() and Path(config.prep.source).is_dir()
    outcomes = run_config(demo_runs / "fresh" / "kstory.yaml", until="prep")
    assert [(o.stage, o.status) for o in outcomes] == [("prep", "ran")]
    assert (demo_runs / "fresh" / "data" / "train" / "metadata.csv").is_file()
    _goto(at, "Story")
    assert any("story manifest is missing" in w.value for w in at.warning)
