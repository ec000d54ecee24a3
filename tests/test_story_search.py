"""Best-of-N search on the tiny Kolors with the tiny scorer, on CPU at 64 px, 2 steps, 4 frames.

Real DiffSynth pipeline pieces, real open_clip and aesthetic predictor code
(random weights): the scores mean nothing, but every property checked here
(determinism, monotonicity, locks, resume, reproducible picks) holds whatever
the scores are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.core.seeds import candidate_seeds
from kstory.scoring.in_memory import load_in_memory_scorer
from kstory.story import review
from kstory.story.objective import Candidate, Goal, rank_key, select
from kstory.submissions.search import SearchSettings, search_story

pytestmark = pytest.mark.usefixtures("one_torch_thread")
UNREACHABLE = dict(threshold=6.0, margin=50.0)  # no set meets it: every round runs


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A 4-frame story (a pose guide on frame 1, batches of 2) in runs/base/story, generated once."""
    root = tmp_path_factory.mktemp("search")
    controlnets = story.build_tiny_controlnets()
    frames = [{"prompt": f"scene {i}", "seed": 100 + i} for i in range(4)]
    frames[0]["guides"] = [{"type": "pose", "pose": "walking", "scale": 0.8}]
    spec = {"title": "search test", "frame_count": 4, "character": {"trigger_word": "ks", "description": "a fox"},
            "defaults": {"width": 64, "height": 64, "steps": 2}, "generation": {"batch_size": 2, "candidates": 3},
            "controlnets": {"pose": {"path": str(controlnets["pose"])}}, "frames": frames}
    (root / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    story.generate_story(root / "story.yaml", root / "runs" / "base" / "story", model="tiny")
    return root / "runs" / "base"


@pytest.fixture(scope="module")
def scorer():
    return load_in_memory_scorer("tiny")


def copy_run(base: Path, tmp_path: Path, name: str = "run") -> Path:
    target = tmp_path / name
    shutil.copytree(base, target)
    return target


def candidates_of(run: Path) -> list[tuple[int, int, str, str]]:
    index = json.loads((run / "candidates" / "index.json").read_text(encoding="utf-8"))
    return [(c["frame"], c["seed"], c["quality"], c["sha256"]) for c in index["candidates"]]


def manifest_of(run: Path) -> dict:
    return json.loads((run / "story" / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def reference(base, scorer, tmp_path_factory):
    """One uninterrupted search with 3 candidates and an unreachable margin."""
    run = copy_run(base, tmp_path_factory.mktemp("reference"))
    return run, search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)


def test_candidate_seeds_are_derived_and_a_longer_list_extends_a_shorter_one():
    assert candidate_seeds(100, 1) == [100]
    assert candidate_seeds(100, 5)[:3] == candidate_seeds(100, 3)
    assert len(set(candidate_seeds(100, 16))) == 16 and candidate_seeds(101, 3) != candidate_seeds(100, 3)
    assert candidate_seeds(100, 0) == []


def test_objective_prefers_sets_that_meet_the_goal_then_identity():
    near, far = [1.0, 0.0], [0.0, 1.0]
    options = {
        1: [Candidate(1, 1, 7.0, 0.3, near), Candidate(1, 2, 6.4, 0.3, far)],
        2: [Candidate(2, 3, 6.3, 0.3, far), Candidate(2, 4, 6.1, 0.3, near), Candidate(2, 5, 9.0, 0.01, near)],
    }
    goal = Goal(threshold=6.0, margin=0.1, clip_t_floor=0.2)
    chosen = select(options, goal)
    assert chosen.met and {f: c.seed for f, c in chosen.picks.items()} == {1: 1, 2: 4}  # alike, on the floor
    assert chosen.identity == pytest.approx(1.0)
    missed = select(options, Goal(threshold=9.0, margin=0.0, clip_t_floor=0.2))
    assert not missed.met and missed.holding_back == [2, 1]  # weakest first
    assert missed.short_of_target == pytest.approx(9.0 - (7.0 + 6.3) / 2)


def test_same_spec_twice_gives_the_same_candidates_and_picks_and_the_picks_regenerate(reference, base, scorer,
                                                                                      tmp_path):
    run, first = reference
    again = search_story(copy_run(base, tmp_path), SearchSettings(**UNREACHABLE), scorer=scorer)
    assert first.rendered == again.rendered == 8  # 4 frames x 2 new seeds (seed 0 is the story's own frame)
    assert candidates_of(run) == candidates_of(tmp_path / "run")
    assert {f: c.seed for f, c in first.selection.picks.items()} == {f: c.seed for f, c in again.selection.picks.items()}
    assert first.exit_status == 3 and "best set found is kept" in first.render()

    manifest = manifest_of(run)
    for key, frame in manifest["frames"].items():
        seeds = candidate_seeds(100 + int(key) - 1, 3)
        assert [c["seed"] for c in frame["search"]["candidates"]] == seeds
        assert frame["search"]["pick"] == frame["seed"] == first.selection.picks[int(key)].seed
        assert frame["seed_history"][0]["seed"] == seeds[0]
    assert any(frame["seed"] != 100 + int(k) - 1 for k, frame in manifest["frames"].items()), "nothing was picked"
    # verify's path: the story regenerated from its spec copy (the picked seeds) is bit for bit the picked frames
    regen = story.generate_story(run / "story" / "story.yaml", tmp_path / "regen", model="tiny")
    assert {i: h for i, h in regen.frame_hashes.items()} == {int(k): f["sha256"] for k, f in manifest["frames"].items()}


def test_raising_n_never_lowers_the_objective(reference, base, scorer, tmp_path):
    run, three = reference
    goal = Goal(**UNREACHABLE)
    results = {n: search_story(copy_run(base, tmp_path, f"n{n}"), SearchSettings(candidates=n, **UNREACHABLE),
                               scorer=scorer) for n in (1, 2)}
    keys = [rank_key(r.selection.picks, goal) for r in (results[1], results[2], three)]
    assert keys == sorted(keys)
    assert results[1].rendered == 0 and results[2].rendered == 4


def test_goal_met_stops_early_and_exits_0(base, scorer, tmp_path):
    run = copy_run(base, tmp_path)
    plain = search_story(run, SearchSettings(candidates=1, **UNREACHABLE), scorer=scorer)
    target = plain.selection.mean + 0.001  # just above the story as it is: one better frame reaches it
    result = search_story(run, SearchSettings(candidates=6, threshold=target, margin=0.0), scorer=scorer)
    assert result.selection.met and result.exit_status == 0 and result.seconds_to_goal is not None
    assert result.rendered < 4 * 5 and any("stopped early" in note for note in result.notes)


def test_locked_frames_are_untouched(base, scorer, tmp_path):
    run = copy_run(base, tmp_path)
    before = manifest_of(run)["frames"]["2"]
    review.save(run / "story", review.Review(locked={"2"}))
    result = search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)
    after = manifest_of(run)["frames"]["2"]
    assert after == before and "search" not in after
    assert 2 not in {frame for frame, *_ in candidates_of(run)} and result.rendered == 6
    assert (run / "story" / "review.json").is_file()


def test_interrupted_search_resumes_without_rendering_finished_candidates(reference, base, scorer, tmp_path):
    run = copy_run(base, tmp_path)
    events = []

    def stop_after_two_batches(event):
        events.append(event)
        if len(events) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer, progress=stop_after_two_batches)
    finished = candidates_of(run)
    assert len(finished) == 4 and manifest_of(run) == manifest_of(base)  # the story is as it was
    stamps = {p: p.stat().st_mtime_ns for p in (run / "candidates").rglob("*.png")}
    resumed = search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)
    assert resumed.reused == 4 and resumed.rendered == 4
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    ref_run, ref = reference
    assert candidates_of(run) == candidates_of(ref_run)
    assert {f: c.seed for f, c in resumed.selection.picks.items()} == {f: c.seed for f, c in ref.selection.picks.items()}
    assert {k: f["sha256"] for k, f in manifest_of(run)["frames"].items()} == \
        {k: f["sha256"] for k, f in manifest_of(ref_run)["frames"].items()}


def test_preview_pass_prunes_and_reports_the_rank_correlation(base, scorer, tmp_path):
    run = copy_run(base, tmp_path)
    result = search_story(run, SearchSettings(candidates=4, preview_steps=1, keep=2, **UNREACHABLE), scorer=scorer)
    kinds = [quality for _, _, quality, _ in candidates_of(run)]
    assert kinds.count("preview") == 16 and kinds.count("full") <= 4 * 2
    assert result.rank_correlation is None or -1.0 <= result.rank_correlation <= 1.0
    frame = manifest_of(run)["frames"]["1"]["search"]
    assert {c["quality"] for c in frame["candidates"]} == {"full", "preview"}


def test_fewer_than_one_candidate_keeps_the_story_and_exits_3(base, scorer, tmp_path):
    run = copy_run(base, tmp_path)
    result = search_story(run, SearchSettings(candidates=0, threshold=0.0, margin=0.0), scorer=scorer)
    assert result.exit_status == 3 and result.rendered == 0 and "below 1" in result.render()
    assert manifest_of(run) == manifest_of(base)


def test_missing_scorer_weights_fail_before_rendering(base, tmp_path):
    from kstory.cli import main

    run = copy_run(base, tmp_path)
    with pytest.raises(KstoryError, match="--aesthetic-model tiny"):
        load_in_memory_scorer(tmp_path / "no-predictor")
    assert main(["search", str(run), "--aesthetic-model", str(tmp_path / "no-predictor")]) == 2
    assert not (run / "candidates").exists()


@pytest.mark.slow
def test_search_then_score_package_verify_ships_the_candidates_and_regenerates_the_picks(tmp_path):
    from test_submissions_package import SUFFIX, TEAM, make_quick_run

    from kstory.cli import main
    from kstory.submissions import verify_package

    run = make_quick_run(tmp_path / "run")
    assert main(["search", str(run), "--aesthetic-model", "tiny", "--candidates", "2", "--margin", "50"]) == 3
    picked = manifest_of(run)["frames"]
    searched = [k for k, f in picked.items() if "search" in f]  # the demo's identity frames are kept as they are
    assert searched and all(len(picked[k]["search"]["candidates"]) == 2 for k in searched)
    assert all((picked[k].get("consistent_attention") or {}).get("role") == "identity"
               for k in picked if k not in searched)
    assert main(["score", str(run), "--aesthetic-model", "tiny"]) in (0, 3)
    assert main(["package", str(run), "--team", TEAM, "--suffix", SUFFIX, "--allow-failed-gate",
                 "--allow-test-model"]) == 0
    shipped = json.loads((run / "submission" / "candidates.json").read_text(encoding="utf-8"))
    first = searched[0]
    assert shipped["frames"][first] == picked[first]["search"] and shipped["search"]["candidates"] == 2
    assert (run / "submission" / "candidates.png").is_file()
    report = verify_package(run / "submission", model="tiny")
    assert report.verdict == "identical", report.render()
    assert len(report.frames) == 8  # the picks only, not the candidates


@pytest.fixture(scope="module")
def sharing(tmp_path_factory) -> Path:
    """A 4-frame story with consistent attention: frames 1 and 2 fill the bank, 3 and 4 read it (batches of 2)."""
    root = tmp_path_factory.mktemp("sharing")
    spec = {"title": "sharing search", "frame_count": 4, "character": {"trigger_word": "ks", "description": "a fox"},
            "defaults": {"width": 64, "height": 64, "steps": 2},
            "generation": {"batch_size": 2, "candidates": 3,
                           "consistent_attention": {"share": 0.5, "identity_frames": [1, 2], "frames": [3, 4],
                                                    "start_step": 0}},
            "frames": [{"prompt": f"scene {i}", "seed": 200 + i} for i in range(4)]}
    (root / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    story.generate_story(root / "story.yaml", root / "runs" / "sharing" / "story", model="tiny")
    return root / "runs" / "sharing"


def test_consistent_attention_searches_the_readers_with_the_bank_and_keeps_identity_frames(sharing, scorer,
                                                                                          tmp_path):
    from kstory.story.candidates import FrameTies, candidate_key, candidates_dir
    from kstory.story.pick_candidate import pick_candidate
    from kstory.story.reroll_frame import plan_from_record

    run = copy_run(sharing, tmp_path)
    before = manifest_of(run)["frames"]
    assert before["3"]["consistent_attention"]["role"] == "reader"
    result = search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)
    after = manifest_of(run)["frames"]
    assert result.rendered == 4  # frames 3 and 4, two new seeds each
    assert any("identity frame(s) 1, 2 of consistent attention kept" in note for note in result.notes)
    for key in ("1", "2"):
        assert after[key] == before[key] and "search" not in after[key]
    assert {frame for frame, *_ in candidates_of(run)} == {3, 4}
    picked = [k for k in ("3", "4") if after[k]["seed"] != before[k]["seed"]]
    assert picked, "nothing was picked"
    for key in ("3", "4"):
        assert after[key]["consistent_attention"] == before[key]["consistent_attention"]
    # a candidate's key is the key a story run computes for the frame (sharing included)
    story_dir = run / "story"
    plans = {int(k): plan_from_record(story_dir, int(k), r) for k, r in after.items()}
    ties = FrameTies.of(plans, manifest_of(run))
    assert candidate_key(plans[3], after["3"]["batch"], manifest_of(run)["setup_id"], "full", ties) == after["3"]["key"]
    # a reviewer's pick of another reader candidate, then the story made from its spec copy: bit for bit the same
    other = next(c["seed"] for c in after["4"]["search"]["candidates"] if c["seed"] != after["4"]["seed"])
    assert pick_candidate(story_dir, 4, other)
    manifest = manifest_of(run)["frames"]
    regen = story.generate_story(story_dir / "story.yaml", tmp_path / "regen", model="tiny")
    assert regen.frame_hashes == {int(k): f["sha256"] for k, f in manifest.items()}
    assert (candidates_dir(story_dir) / "index.json").is_file()
    # and a story run in place keeps every frame as it is (the keys match what it computes)
    again = story.generate_story(story_dir / "story.yaml", story_dir, model="tiny")
    assert again.generated == [] and again.frame_hashes == regen.frame_hashes
    assert manifest_of(run)["frames"]["4"]["seed"] == other



def test_character_reference_frames_are_searched_with_the_reference_and_the_reference_frame_kept(scorer,
                                                                                                 tmp_path):
    from kstory.story.pick_candidate import pick_candidate

    spec = {"title": "reference search", "frame_count": 3, "character": {
                "trigger_word": "ks", "description": "a fox",
                "reference": {"frame": 1, "adapter": "tiny", "frames": [2, 3], "scale": 1.0}},
            "defaults": {"width": 64, "height": 64, "steps": 2}, "generation": {"batch_size": 2, "candidates": 3},
            "frames": [{"prompt": f"scene {i}", "seed": 300 + i} for i in range(3)]}
    (tmp_path / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    run = tmp_path / "runs" / "ref"
    story.generate_story(tmp_path / "story.yaml", run / "story", model="tiny")
    before = manifest_of(run)["frames"]
    assert before["2"]["ip_adapter"]["reference"]["frame"] == 1
    result = search_story(run, SearchSettings(**UNREACHABLE), scorer=scorer)
    after = manifest_of(run)["frames"]
    assert result.rendered == 4 and any("reference frame(s) 1 of the character reference kept" in n
                                        for n in result.notes)
    assert after["1"] == before["1"] and {frame for frame, *_ in candidates_of(run)} == {2, 3}
    assert after["2"]["ip_adapter"] == before["2"]["ip_adapter"]
    other = next(c["seed"] for c in after["3"]["search"]["candidates"] if c["seed"] != after["3"]["seed"])
    pick_candidate(run / "story", 3, other)
    manifest = manifest_of(run)["frames"]
    assert any(manifest[k]["seed"] != before[k]["seed"] for k in ("2", "3"))
    regen = story.generate_story(run / "story" / "story.yaml", tmp_path / "regen", model="tiny")
    assert regen.frame_hashes == {int(k): f["sha256"] for k, f in manifest.items()}
    again = story.generate_story(run / "story" / "story.yaml", run / "story", model="tiny")
    assert again.generated == []
