"""Picking among a searched story's candidates: the story-stage pick and the dashboard's Candidates page.

A tiny 4-frame story (tests/test_story_search.py's fixture: the tiny Kolors at
64 px, 2 steps, the tiny scorer) searched once with 3 candidates per frame;
real DiffSynth, open_clip and Streamlit (AppTest) code.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from test_story_search import UNREACHABLE, base, manifest_of, scorer  # noqa: F401 (fixtures)

import kstory.story as story
from tests.app_pages import open_page
from kstory.core.errors import KstoryError
from kstory.story import review
from kstory.story.candidates import FULL, candidates_dir
from kstory.story.pick_candidate import pick_candidate
from kstory.submissions.search import SearchSettings, search_story

pytestmark = pytest.mark.usefixtures("one_torch_thread")
JOB_TIMEOUT = 300


@pytest.fixture(scope="module")
def searched(base, scorer, tmp_path_factory) -> Path:  # noqa: F811
    """runs/searched: the base story after one search (3 candidates per frame, goal out of reach)."""
    run = tmp_path_factory.mktemp("picked") / "runs" / "searched"
    shutil.copytree(base, run)
    search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "runs" / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns(".jobs", ".lock.json"))
    return target


def _other_candidate(run: Path, frame: str) -> int:
    """A full-quality candidate of ``frame`` that is not the story's frame now."""
    record = manifest_of(run)["frames"][frame]
    return next(c["seed"] for c in record["search"]["candidates"]
                if c["quality"] == FULL and c["seed"] != record["seed"])


def _index_file(run: Path, frame: int, seed: int) -> Path:
    index = json.loads((candidates_dir(run / "story") / "index.json").read_text(encoding="utf-8"))
    [entry] = [c for c in index["candidates"] if (c["frame"], c["seed"], c["quality"]) == (frame, seed, FULL)]
    return candidates_dir(run / "story") / entry["file"]


def test_a_picked_candidate_is_the_frame_a_story_run_with_its_seed_makes(searched, base, tmp_path):  # noqa: F811
    run = _copy(searched, tmp_path)
    before = manifest_of(run)["frames"]["2"]
    seed = _other_candidate(run, "2")
    assert pick_candidate(run / "story", 2, seed) is True
    after = manifest_of(run)["frames"]["2"]
    assert after["seed"] == seed and after["search"]["pick"] == seed and after["search"]["picked_by"] == "review"
    assert after["origin"] == ("spec" if seed == after["spec_seed"] else "search")
    assert after["seed_history"][-1]["seed"] == seed
    assert after["search"]["candidates"] == before["search"]["candidates"]
    assert (run / "story" / "frames" / "02.png").read_bytes() == _index_file(run, 2, seed).read_bytes()
    assert any((run / ".history").iterdir()), "the previous story was not kept"
    others = {k: f["sha256"] for k, f in manifest_of(run)["frames"].items() if k != "2"}
    assert others == {k: f["sha256"] for k, f in manifest_of(searched)["frames"].items() if k != "2"}
    # verify's path: the story regenerated from its spec copy is bit for bit the story with the reviewer's pick
    regen = story.generate_story(run / "story" / "story.yaml", tmp_path / "regen", model="tiny")
    assert regen.frame_hashes == {int(k): f["sha256"] for k, f in manifest_of(run)["frames"].items()}
    # the replaced picture stayed among the candidates: picking it back restores the frame exactly
    assert pick_candidate(run / "story", 2, before["seed"]) is True
    assert manifest_of(run)["frames"]["2"]["sha256"] == before["sha256"]
    assert pick_candidate(run / "story", 2, before["seed"]) is False  # already the frame: nothing written


def test_a_search_keeps_the_pictures_its_picks_replace(searched, base):  # noqa: F811
    story_before = manifest_of(base)["frames"]
    for key, record in manifest_of(searched)["frames"].items():
        original = story_before[key]
        if record["seed"] != original["seed"]:
            kept = _index_file(searched, int(key), original["seed"])
            assert kept.read_bytes() == (base / "story" / original["file"]).read_bytes()


def test_bad_picks_are_refused_with_the_fix(searched, base, tmp_path):  # noqa: F811
    run = _copy(searched, tmp_path)
    with pytest.raises(KstoryError, match="not a full-quality candidate of frame 1"):
        pick_candidate(run / "story", 1, 12345)
    with pytest.raises(KstoryError, match="no frame 9"):
        pick_candidate(run / "story", 9, 1)
    seed = _other_candidate(run, "1")
    review.save(run / "story", review.Review(locked={"1"}))
    with pytest.raises(KstoryError, match="frame 1 is locked"):
        pick_candidate(run / "story", 1, seed)
    review.save(run / "story", review.Review())
    _index_file(run, 1, seed).write_bytes(b"changed")
    with pytest.raises(KstoryError, match="not on disk") as error:
        pick_candidate(run / "story", 1, seed)
    assert "kstory search" in error.value.render()
    with pytest.raises(KstoryError, match="never searched"):
        pick_candidate(base / "story", 1, 100)


# --- the dashboard's Candidates page ------------------------------------------------------------------------

def _page(monkeypatch: pytest.MonkeyPatch, run: Path) -> AppTest:
    return open_page(monkeypatch, run, "Candidates")


def _texts(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "error", "warning", "success", "info")
                     for e in at.get(kind))


def test_candidates_page_sorts_by_score_shows_the_margin_and_records_pick_and_lock(searched, tmp_path,
                                                                                    monkeypatch):
    run = _copy(searched, tmp_path)
    at = _page(monkeypatch, run)
    text = _texts(at)
    assert any("gate margin" in m.label for m in at.metric) and "from the gate 6" in text
    [mean] = [m.value for m in at.metric if m.label.startswith("story mean")]
    assert mean != "—" and float(mean) == pytest.approx(sum(
        c["aesthetic"] for f in manifest_of(run)["frames"].values() for c in f["search"]["candidates"]
        if c["quality"] == FULL and c["seed"] == f["seed"]) / 4, abs=1e-3)
    for key, record in manifest_of(run)["frames"].items():  # each frame's candidates, best aesthetic first
        full = sorted((c for c in record["search"]["candidates"] if c["quality"] == FULL),
                      key=lambda c: (-c["aesthetic"], c["seed"]))
        positions = [text.index(f"seed **{c['seed']}**") for c in full]
        assert len(full) == 3 and positions == sorted(positions), f"frame {key}'s candidates are not best first"

    seed = _other_candidate(run, "3")
    at.button(key=f"pick_3_{seed}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert any(f"frame 3 is now candidate seed {seed}" in s.value for s in at.success), _texts(at)
    picked = manifest_of(run)["frames"]["3"]
    assert picked["seed"] == seed and picked["search"]["picked_by"] == "review"
    assert not (run / ".lock.json").exists()

    at.button(key="cand_lock_3").click().run()
    assert review.load(run / "story").locked == {"3"}
    other = _other_candidate(run, "3")
    assert at.button(key=f"pick_3_{other}").disabled
    assert any("Frame 3 🔒" in h.value for h in at.subheader)


def test_search_job_from_the_page_fills_the_grid(base, tmp_path, monkeypatch):  # noqa: F811
    from kstory.cli import jobs

    run = _copy(base, tmp_path)
    at = _page(monkeypatch, run)
    assert any("never searched" in i.value for i in at.info)
    at.number_input(key="search_candidates").set_value(2).run()
    at.number_input(key="search_margin").set_value(10.0).run()  # out of the tiny scorer's reach: every round runs
    at.text_input(key="search_model").input("tiny").run()
    at.button(key="search_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [job] = [j for j in jobs.list_jobs(run) if j["label"].startswith("Search 2 candidates")]
    job = jobs.wait(run, job["id"], JOB_TIMEOUT)
    assert job["state"] == "done", (job, jobs.log_tail(run, job["id"]))
    assert "4 rendered" in job["result"] and "goal NOT met" in job["result"]
    frames = manifest_of(run)["frames"]
    assert all(len(f["search"]["candidates"]) == 2 for f in frames.values())
    again = _page(monkeypatch, run)
    assert sum(1 for b in again.button if b.key and b.key.startswith("pick_")) >= 4
