"""Story page: the frames in story order with prompt, seed, guide, scores and flags; re-roll, lock, reorder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from kstory.app import actions, jobs_panel
from kstory.app.page_start import open_page, read_story
from kstory.app.ui import Context, show_image
from kstory.core import run_access
from kstory.core.hashing import sha256_file
from kstory.core.rundir import RunDir
from kstory.story import review

COLUMNS = 4


def _scores_by_name(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {Path(str(item.get("file", ""))).name: item for item in scores.get("images", []) if isinstance(item, dict)}


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "—"


def flags_for(name: str, score: dict[str, Any] | None, summary: dict[str, Any]) -> list[str]:
    """Why a frame needs attention: it pulls the mean below the gate, it is the weakest, the odd one out."""
    if score is None:
        return ["not scored"]
    flags = []
    threshold = summary.get("threshold")
    aesthetic = score.get("aesthetic")
    failed = summary.get("gate") not in (None, "pass")
    if failed and isinstance(aesthetic, (int, float)) and isinstance(threshold, (int, float)) and aesthetic < threshold:
        flags.append(f"pulls the mean below the gate ({_fmt(aesthetic)} < {_fmt(threshold, 1)})")
    if name in {Path(str(w.get("file", ""))).name for w in summary.get("weakest", []) if isinstance(w, dict)}:
        flags.append("among the weakest")
    if summary.get("odd_one_out") and Path(str(summary["odd_one_out"])).name == name:
        flags.append("odd one out (least like the others)")
    return flags


def sharing_note(record: dict[str, Any]) -> str:
    """What consistent attention did for this frame, from its manifest entry (docs/story.md#consistent-attention)."""
    sharing = record.get("consistent_attention")
    if not isinstance(sharing, dict):
        return "consistent attention: off"
    bank = ", ".join(str(i) for i in sharing.get("bank", [])) or "none"
    role = "identity frame" if sharing.get("role") == "identity" else "reads the bank"
    return f"consistent attention: {role} (tokens of frames {bank}, share {sharing.get('share')})"


def _frame_card(story: Path, key: str, record: dict[str, Any], score: dict[str, Any] | None,
                summary: dict[str, Any], state: review.Review, keys: list[str], position: int) -> None:
    frame_path = run_access.inside(story, str(record.get("file", "")))
    name = frame_path.name if frame_path else "?"
    locked = key in state.locked
    show_image(frame_path, caption=f"{position}. frame {key}" + (" 🔒" if locked else ""))
    st.caption(str(record.get("prompt", "")))
    stale = score is not None and frame_path is not None and frame_path.is_file() and \
        score.get("sha256") not in (None, sha256_file(frame_path))
    st.markdown(f"seed **{record.get('seed', '?')}** · aesthetic **{_fmt((score or {}).get('aesthetic'))}** · "
                f"identity (CLIP-I to the others) **{_fmt((score or {}).get('clip_i_to_others'), 3)}** · "
                f"CLIP-T {_fmt((score or {}).get('clip_t'), 3)}")
    st.caption(sharing_note(record))
    if stale:
        st.warning("score is stale: the frame changed since it was scored")
    for flag in flags_for(name, score, summary):
        st.error(f"⚠ {flag}", icon=None)
    for guide in record.get("guides", []) or []:
        show_image(run_access.inside(story, str(guide.get("file", ""))), caption=f"guide: {guide.get('kind', '?')}",
                   size=96)
    history = record.get("seed_history") or []
    if len(history) > 1:
        with st.expander(f"seed history ({len(history)})"):
            for entry in history:
                st.caption(f"seed {entry.get('seed')}: {entry.get('prompt', '')} ({entry.get('at', '')})")
    left, mid, right = st.columns(3)
    if left.button("↑", key=f"up_{key}", disabled=position == 1, help="earlier in the story"):
        state.move(keys, key, -1)
        review.save(story, state)
        st.rerun()
    if mid.button("↓", key=f"down_{key}", disabled=position == len(keys), help="later in the story"):
        state.move(keys, key, +1)
        review.save(story, state)
        st.rerun()
    if right.button("Unlock" if locked else "Lock", key=f"lock_{key}"):
        (state.locked.discard if locked else state.locked.add)(key)
        review.save(story, state)
        st.rerun()


def _summary(scores: run_access.Loaded) -> dict[str, Any]:
    if not scores.ok:
        st.warning(scores.problem)
        return {}
    summary = scores.data.get("summary", {}) or {}
    cols = st.columns(4)
    cols[0].metric("mean aesthetic", _fmt(summary.get("mean")))
    cols[1].metric("gate", f"{summary.get('gate', '?')} (≥ {_fmt(summary.get('threshold'), 1)})")
    cols[2].metric("min", _fmt(summary.get("min")))
    identity = scores.data.get("identity") or {}
    cols[3].metric("identity (mean pairwise CLIP-I)", _fmt(identity.get("clip_i", summary.get("clip_i_mean")), 3))
    return summary


def _reroll_form(run: RunDir, records: dict[str, Any], state: review.Review, order: list[str], busy: bool) -> None:
    st.subheader("Re-roll a frame")
    st.caption("to repaint one region of a frame, or make a variation that keeps its composition, use the Repair page")
    # An identity frame of consistent attention feeds the frames that read its bank: re-rolling it alone is refused.
    identity = [k for k in order if (records.get(k, {}).get("consistent_attention") or {}).get("role") == "identity"]
    free = [k for k in order if k not in state.locked and k not in identity]
    if identity:
        st.caption(f"frame(s) {', '.join(identity)} are identity frames of consistent attention: change them in the "
                   "spec and regenerate the story (`kstory story`), which remakes the frames that read them too")
    if not free:
        st.info("every frame is locked")
        return
    key = st.selectbox("Frame", free, key="reroll_frame")
    record = records[key]
    random = st.checkbox("New random seed", value=True, key="reroll_random")
    seed = st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=int(record.get("seed", 0) or 0),
                           step=1, key=f"reroll_seed_{key}", disabled=random)
    prompt = st.text_area("Frame prompt", value=str(record.get("frame_prompt", "")), key=f"reroll_prompt_{key}")
    st.caption(f"model: {(run_access.read_json(run.story / 'manifest.json', 'manifest', 'kstory story').data or {}).get('model', {}).get('spec', '?')}; "
               "the frame is regenerated with its batch companions, then the story is scored again")
    if st.button(f"Re-roll frame {key}", key="reroll_go", type="primary", disabled=busy,
                 help="runs as a job: it goes on if this page is closed"):
        new_prompt = prompt.strip() if prompt.strip() and prompt.strip() != record.get("frame_prompt") else None
        new_seed = None if random and new_prompt is None else (int(record["seed"]) if random else int(seed))
        if jobs_panel.start(run.root, actions.reroll_steps(run.root, key, seed=new_seed, prompt=new_prompt),
                            f"Re-roll frame {key} and score the story"):
            st.rerun()
    if st.button("Score the story again", key="rescore_go", disabled=busy):
        if jobs_panel.start(run.root, actions.rescore_steps(run.root), "Score the story"):
            st.rerun()


def render(ctx: Context) -> None:
    run, busy = open_page(ctx, "Story", "story_message")
    story = read_story(run)
    if story is None:
        return
    manifest, records = story
    if not records:
        st.warning("the manifest lists no frames: run `kstory story` again")
        return
    summary = _summary(run_access.read_json(run.scores, "the scores", "kstory score"))
    scores = _scores_by_name(run_access.read_json(run.scores, "the scores", "kstory score").data or {})
    state = review.load(run.story)
    made_with = (manifest.get("lora") or {}).get("checkpoint") if isinstance(manifest.get("lora"), dict) else None
    if state.checkpoint != made_with:
        st.info(f"checkpoint {state.checkpoint or 'none (the final LoRA)'} is picked, the frames were made with "
                f"{made_with or 'the final LoRA'}: `kstory run` makes the story with the pick; re-rolls keep "
                "the story's LoRA until then")
    keys = list(records)
    order = state.ordered(keys)
    for start in range(0, len(order), COLUMNS):
        columns = st.columns(COLUMNS)
        for offset, (column, key) in enumerate(zip(columns, order[start:start + COLUMNS])):
            with column, st.container(border=True):
                name = Path(str(records[key].get("file", ""))).name
                _frame_card(run.story, key, records[key], scores.get(name), summary, state, keys, start + offset + 1)
    if state.order and state.ordered(keys) != review.Review().ordered(keys):
        if st.button("Reset to the manifest's order", key="reset_order"):
            state.order = []
            review.save(run.story, state)
            st.rerun()
    _reroll_form(run, records, state, order, busy)
