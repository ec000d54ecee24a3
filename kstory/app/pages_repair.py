"""Repair page: fix one region of a frame (inpaint through a mask) or make a variation of it; compare, keep or undo.

The mask is a rectangle or ellipse set with sliders, or an uploaded picture
(kept in ``RUN/masks/``, kstory.app.repair_masks); the preview tints the region
and its feathered edge. The repair runs as a job (kstory.story.repair_frame,
the same call as ``kstory inpaint`` / ``kstory reroll --strength``). Then the
frame before its last repair (taken from ``.history/`` by
kstory.story.undo_repair) and after it are shown side by side: Keep puts the
comparison away, Undo puts the previous picture back and keeps the repaired
story in ``.history/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st
from PIL import Image

from kstory.app import actions, jobs_panel, repair_masks
from kstory.app.page_start import open_page, read_story
from kstory.app.ui import Context, guarded, show_error, thumbnail
from kstory.core import run_access
from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir
from kstory.core.runlock import run_lock
from kstory.story import review
from kstory.story.masks import DEFAULT_THRESHOLD, Mask, read_mask

_KEPT = "repair_kept"  # frame pictures (sha256) whose last repair the user kept: their comparison is put away
FULL_SIZE = 4096  # thumbnails of the frame are taken at up to this size: the page shows the real pixels


def _picture(path: Path | None, caption: str) -> None:
    image = thumbnail(path, FULL_SIZE)
    if image is None:
        st.caption(f"(no preview: {path.name if path else 'no file'} is missing or unreadable) {caption}")
    else:
        st.image(repair_masks.enlarged(image), caption=caption)


def _current_prompt(record: dict[str, Any]) -> str:
    """The frame prompt a repair keeps when none is typed: the last repair's, else the frame's."""
    repairs = record.get("repairs") or []
    return str((repairs[-1] if repairs else record).get("frame_prompt", ""))


def _seed_and_prompt(prefix: str, key: str, record: dict[str, Any]) -> tuple[int | None, str | None]:
    """(seed, prompt) for the repair: None keeps the library's default (a fresh seed, the same prompt)."""
    left, right = st.columns([1, 3])
    random = left.checkbox("New random seed", value=True, key=f"{prefix}_random")
    seed = left.number_input("Seed", min_value=0, max_value=2**31 - 1, value=int(record.get("seed", 0) or 0),
                             step=1, key=f"{prefix}_seed_{key}", disabled=random)
    current = _current_prompt(record)
    prompt = right.text_area("Frame prompt", value=current, key=f"{prefix}_prompt_{key}",
                             help="the frame's prompt is kept unless you change it here")
    return (None if random else int(seed)), (prompt.strip() if prompt.strip() and prompt.strip() != current else None)


def _describe(repair: dict[str, Any]) -> str:
    parts = [f"{repair.get('kind')} at strength {repair.get('strength')}", f"seed {repair.get('seed')}",
             f"prompt “{repair.get('frame_prompt', '')}”"]
    if repair.get("kind") == "inpaint":
        parts.append(f"feather {repair.get('feather')} px")
        if repair.get("crop_padding") is not None:
            parts.append(f"crop padding {repair['crop_padding']} px")
        if repair.get("inpaint_model"):
            parts.append(f"inpainting model {repair['inpaint_model'].get('spec')}")
    return ", ".join(parts)


def _undo(run: RunDir, key: str, kind: str) -> None:
    from kstory.story.undo_repair import undo_last_repair

    with guarded(), run_lock(run.root, f"dashboard: undo the last repair of frame {key}"):
        undo_last_repair(run.story, int(key))
        st.session_state["repair_message"] = (
            f"frame {key} is back as it was before its last repair ({kind}); the repaired story is kept in "
            ".history/ and the seed history notes the undo; scores.json is out of date until the story is "
            "scored again (Story page)")
        st.rerun()


def _last_repair(run: RunDir, key: str, record: dict[str, Any], busy: bool) -> None:
    """Before and after the frame's last repair, side by side, with Keep and Undo."""
    from kstory.story.undo_repair import before_last_repair

    repairs = record.get("repairs") or []
    if not repairs or record.get("sha256") in st.session_state.get(_KEPT, []):
        return
    last = repairs[-1]
    found = before_last_repair(run.story, int(key))
    with st.container(border=True):
        st.subheader(f"Frame {key}: its last repair ({len(repairs)} in all)")
        st.caption(_describe(last))
        before = run_access.inside(found[0], str(found[1].get("file", ""))) if found else None
        after = run_access.inside(run.story, str(record.get("file", "")))
        mask_path = run_access.inside(run.story, str(last["mask_file"])) if last.get("mask_file") else None
        columns = st.columns(3 if mask_path else 2)
        with columns[0]:
            if before is None:
                st.caption("the picture before this repair is no longer in .history/, so it cannot be undone here")
            else:
                _picture(before, "before")
        if mask_path:
            with columns[1]:
                source = thumbnail(before or after, FULL_SIZE)
                mask = repair_masks.stored_mask(mask_path, (int(record["width"]), int(record["height"])))
                if source is None or mask is None or source.size != mask.pixels.shape[::-1]:
                    st.caption("(no preview of the mask)")
                else:
                    st.image(repair_masks.enlarged(repair_masks.preview(source, mask, int(last.get("feather", 0)),
                                                                        last.get("crop_padding"))),
                             caption="the region repainted")
        with columns[-1]:
            _picture(after, "after")
        left, right = st.columns(2)
        if left.button("Keep", key="repair_keep", help="keep the repaired frame and put this comparison away"):
            st.session_state.setdefault(_KEPT, []).append(record.get("sha256"))
            st.rerun()
        if right.button("Undo", key="repair_undo", disabled=busy or found is None,
                        help="put the picture before this repair back (the repaired story stays in .history/)"):
            _undo(run, key, str(last.get("kind")))


def _mask_from_shape(key: str, size: tuple[int, int]) -> Mask | None:
    width, height = size
    shape = st.radio("Shape", repair_masks.SHAPES, horizontal=True, key="mask_shape")
    columns = st.columns(4)
    x = columns[0].slider("x (left, px)", 0, width - 1, width // 4, key=f"mask_x_{key}")
    y = columns[1].slider("y (top, px)", 0, height - 1, height // 4, key=f"mask_y_{key}")
    w = columns[2].slider("width (px)", 1, width, width // 2, key=f"mask_w_{key}")
    h = columns[3].slider("height (px)", 1, height, height // 2, key=f"mask_h_{key}")
    try:
        return repair_masks.shape_mask(size, shape, (x, y, w, h))
    except KstoryError as error:
        show_error(error)
        return None


def _mask_from_file(run: RunDir, key: str, size: tuple[int, int], target: Path) -> tuple[Mask | None, int]:
    upload = st.file_uploader("Mask picture (PNG): white is repainted, black kept; a transparent background "
                              "counts as kept", type=["png"], key=f"mask_upload_{key}")
    if upload is not None:
        with guarded():
            repair_masks.save_upload(upload.getvalue(), target)
    threshold = int(st.number_input("Threshold (grey from which a pixel is repainted)", min_value=1, max_value=255,
                                    value=DEFAULT_THRESHOLD, key="mask_threshold"))
    shown = target.relative_to(run.root).as_posix()
    if not target.is_file():
        st.info(f"upload a mask, or put one into the run as {shown}")
        return None, threshold
    try:
        mask = read_mask(target, size, threshold)
    except KstoryError as error:
        show_error(error)
        return None, threshold
    st.caption(f"mask: {shown}")
    if mask.resized_from:
        st.warning(f"the mask is {mask.resized_from[0]}x{mask.resized_from[1]}, the frame {size[0]}x{size[1]}: it is "
                   "resized to the frame (nearest neighbour), as `kstory inpaint` does")
    if mask.threshold is not None:
        st.warning(f"the mask is not black and white: grey values of {threshold} or more are repainted "
                   "(the threshold is recorded with the repair)")
    return mask, threshold


def _inpaint(run: RunDir, key: str, record: dict[str, Any], frame: Image.Image, busy: bool) -> None:
    size = frame.size
    source = st.radio("Mask from", ("a shape", "a mask file"), horizontal=True, key="mask_source")
    threshold = DEFAULT_THRESHOLD
    if source == "a shape":
        target = repair_masks.draft_path(run.root, int(key), "shape")
        mask = _mask_from_shape(key, size)
    else:
        target = repair_masks.draft_path(run.root, int(key), "upload")
        mask, threshold = _mask_from_file(run, key, size, target)
    left, mid, right = st.columns(3)
    strength = left.slider("Strength", 0.05, 1.0, 1.0, 0.05, key="inpaint_strength",
                           help="how much the region changes: 1 repaints it fully")
    feather = mid.slider("Feather (px)", 0, 64, 8, key="inpaint_feather",
                         help="a soft edge this wide outside the mask; beyond it the frame stays exactly as it is")
    crop = right.checkbox("Inpaint only the box around the mask", key="inpaint_crop",
                          help="the box (mask plus padding) is inpainted at the frame's full resolution: more detail "
                               "for a small region")
    padding = right.number_input("Crop padding (px)", min_value=0, max_value=max(size), value=16, step=8,
                                 key="inpaint_crop_padding", disabled=not crop)
    crop_padding = int(padding) if crop else None
    if mask is not None:
        share = mask.pixels.mean()
        st.image(repair_masks.enlarged(repair_masks.preview(frame, mask, int(feather), crop_padding)),
                 caption=f"the region to repaint in red ({share:.0%} of the frame), fading over the "
                         f"{int(feather)}-pixel feather" + ("; the yellow box is inpainted" if crop_padding is not None
                                                            and not mask.whole_frame else ""))
        if mask.whole_frame:
            st.warning("the mask covers the whole frame: this is a full re-roll of the frame at this strength")
    model = st.text_input("Inpainting model (optional)", key="inpaint_model",
                          help="a Kwai-Kolors/Kolors-Inpainting folder (or tiny); empty: the story's own model, "
                               "by latent blending")
    seed, prompt = _seed_and_prompt("inpaint", key, record)
    if st.button(f"Inpaint frame {key}", key="inpaint_go", type="primary", disabled=busy or mask is None,
                 help="runs as a job: it goes on if this page is closed"):
        with guarded():
            if source == "a shape":
                repair_masks.save_mask(mask, target)
            steps = actions.repair_steps(run.root, key, kind="inpaint", strength=strength, seed=seed, prompt=prompt,
                                         mask=target, feather=int(feather), crop_padding=crop_padding,
                                         threshold=threshold, inpaint_model=model.strip() or None)
            if jobs_panel.start(run.root, steps, f"Inpaint frame {key}"):
                st.rerun()


def _variation(run: RunDir, key: str, record: dict[str, Any], busy: bool) -> None:
    strength = st.slider("Strength", 0.05, 1.0, 0.4, 0.05, key="variation_strength",
                         help="0.3-0.6 keeps the composition, 1 repaints the frame fully")
    steps = int(record.get("steps", 0) or 0)
    st.caption(f"the frame is noised and denoised again over the last part of its {steps} steps that the strength "
               "selects (img2img, as `kstory reroll --strength`)")
    seed, prompt = _seed_and_prompt("variation", key, record)
    if st.button(f"Make a variation of frame {key}", key="variation_go", type="primary", disabled=busy,
                 help="runs as a job: it goes on if this page is closed"):
        job = actions.repair_steps(run.root, key, kind="img2img", strength=strength, seed=seed, prompt=prompt)
        if jobs_panel.start(run.root, job, f"Variation of frame {key}"):
            st.rerun()


def render(ctx: Context) -> None:
    run, busy = open_page(ctx, "Repair", "repair_message")
    story = read_story(run)
    if story is None:
        return
    manifest, records = story
    state = review.load(run.story)
    order = state.ordered(list(records))
    free = [k for k in order if k not in state.locked]
    if len(free) < len(order):
        st.caption(f"locked frames ({', '.join(k for k in order if k in state.locked)}) are not repaired: unlock "
                   "them on the Story page")
    if not free:
        st.info("every frame is locked" if records else "the manifest lists no frames: run `kstory story` again")
        return
    key = st.selectbox("Frame", free, key="repair_frame",
                       format_func=lambda k: f"{k}: {records[k].get('frame_prompt', '')}")
    record = records[key]
    frame = thumbnail(run_access.inside(run.story, str(record.get("file", ""))), FULL_SIZE)
    if frame is None:
        st.warning(f"frame {key}'s picture is missing or unreadable: run `kstory story` again")
        return
    _last_repair(run, key, record, busy)
    inpaint, variation = st.tabs(["Inpaint a region", "Variation of the whole frame"])
    with inpaint:
        _inpaint(run, key, record, frame, busy)
    with variation:
        _variation(run, key, record, busy)
