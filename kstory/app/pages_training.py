"""Training page: the loss curve, validation images per checkpoint, and picking a checkpoint."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from kstory.app.ui import Context, show_image
from kstory.core import run_access
from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir
from kstory.story import review


def _steps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("step-*") if p.is_dir()) if folder.is_dir() else []


def _loss_chart(lora: Path) -> None:
    loaded = run_access.read_csv(lora / "loss.csv", "the loss log", "kstory train")
    if not loaded.ok:
        st.warning(loaded.problem)
        return
    try:
        frame = pd.DataFrame(loaded.data)[["step", "loss"]].astype(float).set_index("step")
    except (KeyError, ValueError) as error:
        st.warning(f"loss.csv is unreadable ({error}); run `kstory train` again")
        return
    st.subheader("Loss")
    st.line_chart(frame, x_label="step", y_label="loss")


def _validation(lora: Path, step: str) -> None:
    folder = lora / "validation" / step
    if not folder.is_dir():
        st.info(f"no validation images at {step}")
        return
    loaded = run_access.read_json(folder / "prompts.json", "validation prompts", "kstory train")
    images = loaded.data.get("images", []) if loaded.ok else [{"file": p.name} for p in sorted(folder.glob("*.png"))]
    if not loaded.ok:
        st.warning(loaded.problem)
    columns = st.columns(max(1, min(4, len(images))))
    for i, item in enumerate(images):
        with columns[i % len(columns)]:
            path = run_access.inside(folder, str(item.get("file", "")))
            show_image(path, caption=f"{item.get('prompt', '')} (seed {item.get('seed', '?')})")


def render(ctx: Context) -> None:
    st.header("Training")
    run = RunDir(ctx.run)
    if not run.lora.is_dir():
        st.warning("no lora/ folder: run `kstory train` (or `kstory run`) first")
        return
    summary = run_access.read_json(run.lora / "train.json", "the training summary", "kstory train")
    if summary.ok:
        with st.expander("train.json"):
            st.json(summary.data)
    else:
        st.warning(summary.problem)
    _loss_chart(run.lora)
    checkpoints = _steps(run.lora / "checkpoints")
    validations = _steps(run.lora / "validation")
    steps = sorted(set(checkpoints) | set(validations))
    state = review.load(run.story)
    _final_lora(run, state)
    if not steps:
        st.info("no checkpoints or validation images yet")
        return
    st.subheader("Checkpoints")
    default = steps.index(state.checkpoint) if state.checkpoint in steps else len(steps) - 1
    step = st.selectbox("Checkpoint", steps, index=default, key="checkpoint")
    info = run_access.read_json(run.lora / "checkpoints" / step / "state.json", "checkpoint state", "kstory train")
    if info.ok:
        st.caption(", ".join(f"{k}: {v}" for k, v in info.data.items() if isinstance(v, (int, float, str)))[:500])
    _validation(run.lora, step)
    if st.button("Pick this checkpoint", key="pick_checkpoint", disabled=step not in checkpoints,
                 help="the story is made with this checkpoint's LoRA the next time `kstory run` runs"):
        state.checkpoint = step
        review.save(run.story, state)
        st.success(f"picked {step} (noted in story/review.json): `kstory run` makes the story with "
                   f"{review.checkpoint_lora(run.lora, step)}")
    elif state.checkpoint:
        st.caption(f"picked checkpoint: {state.checkpoint} (the story's LoRA)")


def _final_lora(run: RunDir, state: review.Review) -> None:
    """A pick whose checkpoint is gone stops the story stage; going back to the final LoRA is the user's call."""
    if not state.checkpoint:
        return
    problem = st.empty()  # filled below unless this run clears the pick
    if st.button("Use the final LoRA", key="use_final_lora",
                 help=f"clear the pick ({state.checkpoint}): the story is made with lora/lora.safetensors"):
        review.drop_checkpoint(run.story)
        state.checkpoint = None
        st.success("pick cleared: `kstory run` makes the story with lora/lora.safetensors")
        return
    try:
        review.story_lora(run.lora, run.story)
    except KstoryError as error:
        problem.error(f"{error.message} ({error.path}); fix: {error.fix}")
