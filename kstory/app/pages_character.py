"""Character page: the story's character reference (Kolors IP-Adapter-Plus): see it, choose it, save it, regenerate.

The spec edited is the one ``kstory run`` reads (the run config's
``story.spec``), and only when it lies inside the run folder. The reference is
an uploaded picture (kept in ``RUN/references/``, kstory.app.reference_uploads)
or a frame of the story; each frame uses it or not, at the story-wide scale or
its own. "Save to spec" goes through kstory.story.reference_edit (the spec
model checks the change first, the previous spec goes to ``.history/``);
"Regenerate" runs the config's story stage as a job, which makes again exactly
the frames whose inputs changed. A new kind of reference is one more entry in
``SOURCES`` (and in ``reference_edit.SOURCE_KEYS``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import streamlit as st

from kstory.app import actions, jobs_panel, reference_uploads
from kstory.app.page_start import open_page
from kstory.app.ui import Context, guarded, show_error, show_image
from kstory.core import run_access
from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.rundir import RunDir
from kstory.core.runlock import run_lock
from kstory.story.character_sheet import SHEET_FILE
from kstory.story.consistent_spec import DEFAULT_IDENTITY_FRAMES, sharing_frames
from kstory.story.reference_edit import (
    ReferenceChoice, SavedSpec, SharingChoice, save_reference, save_sharing, spec_relative,
)
from kstory.story.spec import StorySpec, load_spec, reference_frames

COLUMNS = 4
TINY = "tiny"
_SPEC_SHA = "char_spec_sha"  # the spec the widgets were drawn from: when it changes, they start from it again
_UPLOADED = "char_uploaded"  # sha256 of the upload last stored, so a kept upload is not chosen again on every rerun
_HOW = """character:
  reference:
    frame: 1                                 # or image: PATH (relative to the spec)
    adapter: models/Kolors-IP-Adapter-Plus   # relative to the spec; 'tiny' = the offline test adapter"""


@dataclass(frozen=True)
class Page:
    """What the parts of the page share: the run, its spec (path, folder, model) and the story's frame records."""

    run: RunDir
    spec_path: Path
    spec: StorySpec
    records: dict[str, dict[str, Any]]
    editable: bool

    @property
    def spec_dir(self) -> Path:
        return self.spec_path.parent

    def shown(self, path: Path) -> str:
        """``path`` as the page names it: relative to the run when inside it."""
        resolved, root = path.resolve(), self.run.root.resolve()
        return resolved.relative_to(root).as_posix() if resolved.is_relative_to(root) else str(path)

    def in_run(self, relative: str | Path) -> Path | None:
        """A file the spec names (relative to the spec), if it lies inside the run: only those are shown."""
        target = (self.spec_dir / relative).resolve()
        return target if target.is_relative_to(self.run.root.resolve()) else None

    def frame_file(self, index: int) -> Path | None:
        return run_access.inside(self.run.story, str(self.records.get(str(index), {}).get("file", "")))


def _spec_path(run: RunDir) -> tuple[Path, bool] | None:
    """(the spec `kstory run` reads, whether the page may write it); None (with a note) when there is none."""
    if not run.config.is_file():
        st.info("this run has no kstory.yaml, so the spec its story stage reads is unknown: edit your spec's "
                "`character.reference` and run `kstory story SPEC --out RUN/story` (docs/story.md)")
        return None
    from kstory.core.config import load_config

    config = load_config(run.config)
    if config.story is None:
        st.info("the run's kstory.yaml has no story: section (docs/config.md): there is no story spec to edit")
        return None
    spec = Path(config.story.spec)
    inside = spec.resolve().is_relative_to(run.root.resolve())
    if not inside:
        st.info(f"the story spec {spec} lies outside the run folder, and the dashboard writes only inside the run: "
                "the reference is shown, not changed here; copy the spec into the run (e.g. inputs/) and point "
                "story.spec at it to edit it here")
    return spec, inside


def _adapter_problem(page: Page) -> str | None:
    """Why the reference cannot run from here (no reference, no adapter, an adapter folder that is not there)."""
    ref = page.spec.character.reference
    if ref is None:
        return "the spec has no character reference, so no IP-Adapter is configured"
    if not ref.adapter:
        return "the spec's character.reference.adapter is not set: no IP-Adapter is configured"
    if ref.adapter != TINY:
        folder = Path(ref.adapter) if Path(ref.adapter).is_absolute() else page.spec_dir / ref.adapter
        if not folder.is_dir():
            return f"character.reference.adapter names {ref.adapter}, and there is no folder {folder}"
    return None


def _how_to_configure(page: Page, problem: str) -> None:
    st.warning(problem)
    st.markdown(f"Set the IP-Adapter in the spec ({page.shown(page.spec_path)}), then open this page again; "
                "`kstory story SPEC --ip-adapter PATH` overrides `adapter:` on the command line, but the "
                "dashboard's Regenerate runs the config's story stage, which reads the spec (docs/story.md, "
                "\"Character reference\"). The folder is Kwai-Kolors/Kolors-IP-Adapter-Plus as published.")
    st.code(_HOW, language="yaml")


def _made_with(record: dict[str, Any]) -> tuple[float | None, Any]:
    """(scale, reference) a story frame was made with, from its manifest entry; (None, None) without one."""
    entry = record.get("ip_adapter")
    if not isinstance(entry, dict):
        return None, None
    what = entry.get("reference") or {}
    return entry.get("scale"), ("frame", what.get("frame")) if what.get("frame") else ("image", what.get("sha256"))


def _spec_source(page: Page) -> tuple[str, Any]:
    ref = page.spec.character.reference
    if ref.frame is not None:
        return "frame", ref.frame
    if ref.sheet is not None:  # the sheet as last made (a changed sheet prompt shows after Regenerate)
        path = page.run.story / SHEET_FILE
        return "image", sha256_file(path) if path.is_file() else None
    path = page.in_run(ref.image) if not ref.image.is_absolute() else ref.image
    try:
        return "image", sha256_file(path) if path is not None else None
    except OSError:
        return "image", None


def _differs(page: Page, used: dict[int, float]) -> list[int]:
    """Frames whose reference settings in the spec are not those the story was made with."""
    if not page.records:
        return []
    source = _spec_source(page)
    differ = []
    for index in range(1, page.spec.frame_count + 1):
        scale, made = _made_with(page.records.get(str(index), {}))
        if scale != used.get(index) or (index in used and made != source):
            differ.append(index)
    return differ


def _picture(page: Page, index: int, caption: str) -> None:
    path = page.frame_file(index)
    if path is None or not path.is_file():
        st.caption(f"(frame {index} is not made yet) {caption}")
    else:
        show_image(path, caption=caption)


def _current(page: Page, used: dict[int, float]) -> None:
    """The reference the spec names now: its picture, and which frames use it at what scale."""
    ref = page.spec.character.reference
    st.subheader("The reference now")
    adapter = ref.adapter if ref.adapter == TINY else page.shown(page.spec_dir / ref.adapter)
    st.caption(f"spec: {page.shown(page.spec_path)} · IP-Adapter: {adapter} · window {ref.start:g}-{ref.end:g} "
               "of the steps")
    if ref.frame is not None:
        _picture(page, ref.frame, f"the reference: frame {ref.frame}")
    elif ref.sheet is not None:
        sheet = page.run.story / SHEET_FILE
        if sheet.is_file():
            show_image(sheet, caption=f"the reference: the character sheet ({ref.sheet.prompt!r}, seed {ref.sheet.seed})")
        else:
            st.caption(f"the reference: a character sheet ({ref.sheet.prompt!r}, seed {ref.sheet.seed}), "
                       "made first when the story is regenerated")
    else:
        path = page.in_run(ref.image) if not ref.image.is_absolute() else None
        if path is None:
            st.caption(f"the reference: {ref.image} (outside the run, not shown)")
        else:
            show_image(path, caption=f"the reference: {ref.image}")
    uses = ", ".join(f"{i} at {scale:g}" for i, scale in used.items()) or "none"
    st.markdown(f"**Frames that use it:** {uses}")
    pending = _differs(page, used)
    if pending:
        st.info(f"the story was made with other reference settings for frame(s) {', '.join(map(str, pending))}: "
                "Regenerate makes them again")


# --- choosing the reference: one function per kind of source, each returning the spec's source field ----------

def _image_source(page: Page) -> dict[str, Any] | None:
    upload = st.file_uploader("Upload a picture (kept in the run as references/NAME; a different picture of the "
                              "same name gets a new name)", key="char_upload",
                              type=[suffix.lstrip(".") for suffix in reference_uploads.SUFFIXES])
    if upload is not None:
        data = upload.getvalue()
        digest = hashlib.sha256(data).hexdigest()
        if st.session_state.get(_UPLOADED) != digest:
            try:
                stored = reference_uploads.store(page.run.root, upload.name, data)
            except KstoryError as error:
                show_error(error)
            else:
                st.session_state[_UPLOADED] = digest
                st.session_state["char_image"] = spec_relative(stored, page.spec_dir)
    ref = page.spec.character.reference
    options = [ref.image.as_posix()] if ref.image is not None else []
    options += [name for name in (spec_relative(p, page.spec_dir) for p in reference_uploads.stored(page.run.root))
                if name not in options]
    if not options:
        st.info("upload a picture of the character")
        return None
    if st.session_state.get("char_image") not in options:
        st.session_state["char_image"] = options[0]
    chosen = st.selectbox("Picture (as the spec names it, relative to the spec)", options, key="char_image")
    path = page.in_run(chosen)
    if path is not None:
        show_image(path, caption=chosen)
    return {"image": chosen}


def _frame_source(page: Page) -> dict[str, Any] | None:
    count = page.spec.frame_count
    current = page.spec.character.reference.frame or 1
    index = st.selectbox("Frame (made first; its picture serves the others)", list(range(1, count + 1)),
                         index=min(current, count) - 1, key="char_frame")
    _picture(page, int(index), f"frame {index}")
    return {"frame": int(index)}


def _sheet_source(page: Page) -> dict[str, Any] | None:
    current = page.spec.character.reference.sheet
    prompt = st.text_input("Sheet prompt (after the trigger word, description and style, as a frame's)",
                           value=current.prompt if current else "character sheet, full body, plain white background",
                           key="char_sheet_prompt")
    seed = st.number_input("Sheet seed", min_value=0, value=int(current.seed) if current else 0, step=1,
                           key="char_sheet_seed")
    sheet = page.run.story / SHEET_FILE
    if sheet.is_file():
        show_image(sheet, caption=f"{SHEET_FILE} (as last made)")
    else:
        st.caption("the sheet is made first when the story is regenerated")
    kept = {k: v for k, v in (current.model_dump(exclude_none=True) if current else {}).items()
            if k not in ("prompt", "seed")}  # negative prompt and steps, as the spec had them
    return {"sheet": {"prompt": prompt, "seed": int(seed), **kept}}


# The spec's source field -> (what the page calls it, its controls).
SOURCES: dict[str, tuple[str, Callable[[Page], dict[str, Any] | None]]] = {
    "image": ("an uploaded picture", _image_source),
    "frame": ("a frame of the story", _frame_source),
    "sheet": ("a generated character sheet", _sheet_source),
}


def _source(page: Page) -> dict[str, Any] | None:
    ref = page.spec.character.reference
    current = next((key for key in SOURCES if getattr(ref, key, None) is not None), next(iter(SOURCES)))
    kind = st.radio("The reference is", list(SOURCES), index=list(SOURCES).index(current), horizontal=True,
                    format_func=lambda key: SOURCES[key][0], key="char_source")
    return SOURCES[kind][1](page)


def _frames(page: Page, used: dict[int, float]) -> tuple[dict[int, float | None], float]:
    """Per-frame toggles and scales under each frame's picture, and the story-wide scale."""
    ref = page.spec.character.reference
    scale = st.number_input("Story-wide scale (0-2; 0.5: the official samples' value; 0: as without the adapter)",
                            min_value=0.0, max_value=2.0, value=float(ref.scale), step=0.05, key="char_scale")
    chosen: dict[int, float | None] = {}
    count = page.spec.frame_count
    for start in range(1, count + 1, COLUMNS):
        for column, index in zip(st.columns(COLUMNS), range(start, min(start + COLUMNS, count + 1))):
            with column, st.container(border=True):
                note = "the reference" if ref.frame == index else (
                    f"uses it at {used[index]:g}" if index in used else "does not use it")
                made, _ = _made_with(page.records.get(str(index), {}))
                if page.records and made != used.get(index):
                    note += f" (the story: {'made at ' + format(made, 'g') if made is not None else 'made without'})"
                _picture(page, index, f"frame {index}: {note}")
                on = st.checkbox("uses the reference", value=index in used, key=f"char_use_{index}")
                own = page.spec.frames[index - 1].reference_scale
                value = st.number_input("own scale (empty: the story-wide scale)", min_value=0.0, max_value=2.0,
                                        value=own, step=0.05, key=f"char_scale_{index}", placeholder="story-wide")
                if on:
                    chosen[index] = None if value is None else float(value)
    return chosen, float(scale)


def _save(page: Page, write: Callable[[], SavedSpec], what: str) -> None:
    try:
        with run_lock(page.run.root, f"dashboard: save the {what} to the story spec"):
            saved = write()
    except KstoryError as error:
        show_error(error)
        return
    if not saved.changed:
        st.info("the spec already says this: nothing written")
        return
    st.session_state["character_message"] = (
        f"saved {page.shown(saved.path)} (the previous spec is kept as {page.shown(saved.kept)}); "
        f"Regenerate makes the frames whose {what} changed")
    st.rerun()


def _sharing(page: Page, busy: bool) -> None:
    """Consistent attention per frame: which frames write the bank (made first) and which read it."""
    st.subheader("Consistent attention")
    identity, readers = sharing_frames(page.spec)
    numbers = list(range(1, page.spec.frame_count + 1))
    on = st.checkbox("Frames share self-attention (training-free; docs/story.md#consistent-attention)",
                     value=bool(identity), key="char_share_on")
    chosen_identity: list[int] = []
    chosen_readers: list[int] = []
    if on:
        chosen_identity = st.multiselect(
            "Identity frames: made first, they write the bank", numbers,
            default=sorted(identity) or numbers[:DEFAULT_IDENTITY_FRAMES], key="char_share_identity")
        options = [i for i in numbers if i not in chosen_identity]
        wanted = sorted(readers) if identity else options
        chosen_readers = st.multiselect("Frames that read the bank", options,
                                        default=[i for i in wanted if i in options], key="char_share_readers")
    if st.button("Save sharing to spec", key="char_share_save", disabled=busy,
                 help="the spec model checks the change first; the previous spec is kept in .history/"):
        choice = SharingChoice(on, chosen_identity, chosen_identity + chosen_readers)
        with guarded():
            _save(page, lambda: save_sharing(page.spec_path, choice, page.run), "consistent attention")


def _fresh_widgets(spec_path: Path) -> None:
    """Widgets start from the spec again whenever it changed (a save, an edit outside the page)."""
    digest = sha256_file(spec_path)
    if st.session_state.get(_SPEC_SHA) != digest:
        for key in [k for k in st.session_state if str(k).startswith("char_") and k not in ("char_upload", _UPLOADED)]:
            del st.session_state[key]
        st.session_state[_SPEC_SHA] = digest


def render(ctx: Context) -> None:
    run, busy = open_page(ctx, "Character", "character_message")
    found = _spec_path(run)
    if found is None:
        return
    spec_path, editable = found
    spec = load_spec(spec_path)
    manifest = run_access.read_json(run.story / "manifest.json", "the story manifest", "kstory run")
    records = {str(k): v for k, v in ((manifest.data or {}).get("frames") or {}).items() if isinstance(v, dict)}
    page = Page(run, spec_path, spec, records, editable)
    if editable:
        _fresh_widgets(spec_path)
    problem = _adapter_problem(page)
    if problem:
        _how_to_configure(page, problem)
        if editable:
            _sharing(page, busy)
            _regenerate(run, busy)
        return
    used = reference_frames(spec)
    _current(page, used)
    if not editable:
        return
    st.subheader("Choose the reference")
    source = _source(page)
    st.subheader("Frames that use it")
    frames, scale = _frames(page, used)
    if st.button("Save to spec", key="char_save", type="primary", disabled=busy or source is None,
                   help="the spec model checks the change first; the previous spec is kept in .history/"):
        with guarded():
            choice = ReferenceChoice(source, frames, scale)
            _save(page, lambda: save_reference(page.spec_path, choice, page.run), "reference settings")
    _sharing(page, busy)
    _regenerate(run, busy)


def _regenerate(run: RunDir, busy: bool) -> None:
    if st.button("Regenerate", key="char_regenerate", disabled=busy,
                 help="runs the config's story stage as a job: the frames whose inputs changed are made again"):
        if jobs_panel.start(run.root, actions.regenerate_steps(run.root), "Regenerate the story"):
            st.rerun()
