"""Candidates page: each searched frame's candidates, best first, with what picking one does to the gate margin.

It reads what ``kstory search`` wrote (the manifest's per-frame ``search``
records and ``candidates/index.json``); a pick goes through
kstory.story.pick_candidate (the search's own staging path, recorded in the
manifest), a lock into ``story/review.json``, and a new search runs as a job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from kstory.app import actions, jobs_panel
from kstory.app.page_start import open_page, read_story
from kstory.app.ui import Context, guarded, show_image
from kstory.core import run_access
from kstory.core.rundir import RunDir
from kstory.core.runlock import run_lock
from kstory.story import review
from kstory.story.candidates import FULL, INDEX, candidates_dir

COLUMNS = 4
DEFAULT_THRESHOLD = 6.0
MAX_CANDIDATES = 64
MAX_MARGIN = 10.0


@dataclass
class Option:
    """One full-quality candidate of a frame as the page shows it."""

    seed: int
    aesthetic: float
    clip_t: float | None
    identity: float | None
    file: Path | None  # None: its picture is not on disk
    current: bool  # the story's frame now
    mean_if_picked: float | None  # the story's mean aesthetic with this candidate in place (None: unknown)


def _fmt(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def current_aesthetics(records: dict[str, Any], outcome: dict[str, Any]) -> dict[str, float | None]:
    """Each frame's aesthetic now, by the search's scorer: its search record, else (a frame the search kept as it
    was) the last search's score of its pick; None when neither is about the frame's seed now."""
    picks, kept = outcome.get("picks") or {}, outcome.get("pick_scores") or {}
    out: dict[str, float | None] = {}
    for key, record in records.items():
        search = record.get("search") if isinstance(record.get("search"), dict) else {}
        entry = next((c for c in search.get("candidates", []) if c.get("quality") == FULL
                      and c.get("seed") == record.get("seed")), None)
        if entry is None and picks.get(key) == record.get("seed") and isinstance(kept.get(key), dict):
            entry = kept[key]
        out[key] = float(entry["aesthetic"]) if entry and isinstance(entry.get("aesthetic"), (int, float)) else None
    return out


def options_for(story: Path, key: str, record: dict[str, Any], files: dict[tuple[int, int], str],
                now: dict[str, float | None]) -> list[Option]:
    """The frame's full-quality candidates, best aesthetic first, each with the story mean if it were picked."""
    known = None if any(v is None for v in now.values()) else now
    out = []
    for c in record["search"].get("candidates", []):
        if c.get("quality") != FULL or not isinstance(c.get("aesthetic"), (int, float)):
            continue
        seed, current = int(c["seed"]), int(c["seed"]) == record.get("seed")
        if current:
            path = run_access.inside(story, str(record.get("file", "")))
        else:
            name = files.get((int(key), seed))
            path = run_access.inside(candidates_dir(story), name) if name else None
        mean = None
        if known is not None:
            others = sum(v for k, v in known.items() if k != key and v is not None)
            mean = (others + float(c["aesthetic"])) / len(known)
        out.append(Option(seed, float(c["aesthetic"]), c.get("clip_t"), c.get("identity"),
                          path if path is not None and path.is_file() else None, current, mean))
    return sorted(out, key=lambda o: (-o.aesthetic, o.seed))


def _index(story: Path) -> tuple[dict[tuple[int, int], str], dict[str, Any]]:
    """(frame, seed) -> file of each full-quality candidate on the index, and the last search's outcome."""
    loaded = run_access.read_json(candidates_dir(story) / INDEX, "the candidates index", "kstory search")
    data = loaded.data or {}
    files = {(int(c["frame"]), int(c["seed"])): str(c["file"]) for c in data.get("candidates", [])
             if isinstance(c, dict) and c.get("quality") == FULL and "file" in c}
    return files, data.get("search") if isinstance(data.get("search"), dict) else {}


def _pick(run: RunDir, key: str, seed: int) -> None:
    from kstory.story.pick_candidate import pick_candidate

    with guarded(), run_lock(run.root, f"dashboard: pick candidate seed {seed} for frame {key}"):
        if pick_candidate(run.story, int(key), seed):
            st.session_state["candidates_message"] = (
                f"frame {key} is now candidate seed {seed} (the previous story is in .history/); scores.json is "
                "out of date until the story is scored again; lock the frame to keep a later search from "
                "choosing again")
            st.rerun()


def _frame_row(run: RunDir, key: str, record: dict[str, Any], files: dict[tuple[int, int], str],
               now: dict[str, float | None], threshold: float, state: review.Review, busy: bool) -> None:
    locked = key in state.locked
    head, button = st.columns([4, 1])
    head.subheader(f"Frame {key}" + (" 🔒" if locked else ""))
    head.caption(str(record.get("prompt", "")))
    if button.button("Unlock" if locked else "Lock", key=f"cand_lock_{key}"):
        (state.locked.discard if locked else state.locked.add)(key)
        review.save(run.story, state)
        st.rerun()
    options = options_for(run.story, key, record, files, now)
    for start in range(0, len(options), COLUMNS):
        for column, option in zip(st.columns(COLUMNS), options[start:start + COLUMNS]):
            with column, st.container(border=True):
                if option.file is None:
                    st.caption(f"(no picture on disk for seed {option.seed}: `kstory search` renders it again)")
                else:
                    show_image(option.file, size=192)
                st.markdown(f"{'✅ in the story · ' if option.current else ''}seed **{option.seed}** · "
                            f"aesthetic **{_fmt(option.aesthetic)}** · CLIP-T {_fmt(option.clip_t)} · "
                            f"identity {_fmt(option.identity)}")
                if option.mean_if_picked is not None:
                    margin = option.mean_if_picked - threshold
                    st.caption(f"story mean with it: {_fmt(option.mean_if_picked)} ({margin:+.3f} from the gate "
                               f"{threshold:g})")
                if not option.current and st.button("Pick", key=f"pick_{key}_{option.seed}",
                                                    disabled=locked or busy or option.file is None,
                                                    help="locked" if locked else None):
                    _pick(run, key, option.seed)


def _search_form(run: RunDir, outcome: dict[str, Any], busy: bool) -> None:
    st.subheader("Search")
    scorer = (outcome.get("scorer") or {}).get("aesthetic") if isinstance(outcome.get("scorer"), dict) else None
    last_n, last_margin = outcome.get("candidates"), outcome.get("margin")
    left, mid, right = st.columns(3)
    candidates = left.number_input(
        "Candidates per frame", min_value=1, max_value=MAX_CANDIDATES, key="search_candidates",
        value=min(max(int(last_n), 1), MAX_CANDIDATES) if isinstance(last_n, int) else 4)
    margin = mid.number_input(
        "Margin over the gate", min_value=0.0, max_value=MAX_MARGIN, step=0.05, key="search_margin",
        value=min(max(float(last_margin), 0.0), MAX_MARGIN) if isinstance(last_margin, (int, float)) else 0.1)
    model = right.text_input("Aesthetic model", value="kolors-challenge", key="search_model",
                             help="kolors-challenge (the organisers' predictor), a predictor folder, or tiny "
                                  "(random weights: a dry run whose scores mean nothing)")
    if scorer:
        st.caption(f"the last search scored with {scorer}")
    st.caption("locked frames are not searched; finished candidates are reused, so a stopped search resumes")
    if st.button("Search in the background", key="search_go", type="primary", disabled=busy,
                 help="runs `kstory search` as a job: it goes on if this page is closed"):
        steps = actions.search_steps(run.root, candidates=int(candidates), margin=float(margin),
                                     aesthetic_model=model.strip() or "kolors-challenge")
        if jobs_panel.start(run.root, steps, f"Search {int(candidates)} candidates per frame"):
            st.rerun()


def render(ctx: Context) -> None:
    run, busy = open_page(ctx, "Candidates", "candidates_message")
    story = read_story(run)
    if story is None:
        return
    manifest, records = story
    searched = {k: r for k, r in records.items() if isinstance(r.get("search"), dict)}
    files, outcome = _index(run.story)
    if not searched:
        st.info("this story was never searched: start a search below or run `kstory search` on the run")
    else:
        threshold = float(outcome.get("threshold", DEFAULT_THRESHOLD))
        now = current_aesthetics(records, outcome)
        known = [v for v in now.values() if v is not None]
        cols = st.columns(3)
        if len(known) == len(now):
            mean = sum(known) / len(known)
            cols[0].metric("story mean aesthetic (search scores)", _fmt(mean))
            cols[1].metric(f"gate margin (mean − {threshold:g})", f"{mean - threshold:+.3f}")
        else:
            cols[0].metric("story mean aesthetic (search scores)", "—")
            st.caption("a frame changed since the last search has no search score, so the story mean is not shown")
        cols[2].metric("target (gate + margin)", _fmt(threshold + float(outcome.get("margin", 0.0))))
        state = review.load(run.story)
        for key in state.ordered(list(records)):
            if key in searched:
                with st.container(border=True):
                    _frame_row(run, key, records[key], files, now, threshold, state, busy)
    _search_form(run, outcome, busy)
