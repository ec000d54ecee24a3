"""Package page: the model name with live validation, build the package, preview its model card, upload it."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import streamlit as st

from kstory.app import actions, jobs_panel

from kstory.core import run_access
from kstory.app.ui import Context, guarded
from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir

_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")
_SECRET = "_upload_secret"
_FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.S)


def card_preview(submission: Path, text: str) -> tuple[str | None, str]:
    """The card's front matter and its body with relative images inlined, as ModelScope would show them."""
    front = _FRONT_MATTER.match(text)
    body = text[front.end():] if front else text

    def inline(match: re.Match) -> str:
        target = run_access.inside(submission, match.group(2))
        if target is None or not target.is_file() or target.suffix.lower() not in {".png", ".jpg", ".jpeg"}:
            return match.group(0)
        kind = "jpeg" if target.suffix.lower() in {".jpg", ".jpeg"} else "png"
        data = base64.b64encode(target.read_bytes()).decode()
        return f"{match.group(1)}data:image/{kind};base64,{data}{match.group(3)}"

    return (front.group(1) if front else None), _IMAGE_LINK.sub(inline, body)


def _name(team: str, suffix: str) -> str | None:
    from kstory.submissions.naming import RULE, model_name

    if not team.strip() and not suffix.strip():
        st.caption(f"naming rule: {RULE}")
        return None
    try:
        name = model_name(team, suffix)
    except KstoryError as error:
        st.error(error.render())
        return None
    st.success(f"model name: {name}")
    return name


def _take_token() -> None:
    """On submit: move the token out of its widget (cleared now) into a slot the next run pops at once."""
    st.session_state[_SECRET] = st.session_state.get("upload_token", "")
    st.session_state["upload_token"] = ""


def _publish_state(submission: Path, index: dict) -> None:
    """Say up front what upload will refuse or warn about: a test artefact, a failed gate, a missing or failed verify."""
    from kstory.submissions.upload import package_provenance
    from kstory.submissions.verify_record import verify_status

    try:
        origin = package_provenance(submission)
    except KstoryError as error:
        st.error(error.render())
        return
    if origin.is_test:
        st.warning("this package is a TEST ARTEFACT, not a Kolors LoRA: " + "; ".join(origin.reasons))
    if index.get("gate") != "pass":
        st.warning(f"the package's score gate did not pass (gate: {index.get('gate')})")
    state = verify_status(submission)
    if state == "missing":
        st.warning(f"not verified since it was built: run `kstory verify {submission}` first")
    elif state == "failed":
        st.warning("the package failed its last `kstory verify`")


def _upload(submission: Path, name: str, index: dict, busy: bool) -> None:
    st.subheader("Upload to ModelScope")
    _publish_state(submission, index)
    with st.form("upload", clear_on_submit=True):
        owner = st.text_input("ModelScope owner (user or organisation)", key="upload_owner")
        token = st.text_input("Access token (never stored)", type="password", key="upload_token")
        dry_run = st.checkbox("Dry run (list what would be uploaded)", value=True, key="upload_dry")
        endpoint = st.text_input("Endpoint (empty: ModelScope)", key="upload_endpoint")
        allow = {
            "allow_test_model": st.checkbox("Upload even if it is a test artefact", key="upload_allow_test"),
            "allow_failed_gate": st.checkbox("Upload even if the gate failed", key="upload_allow_gate"),
            "allow_failed_verify": st.checkbox("Upload even if verify failed", key="upload_allow_verify"),
        }
        submitted = st.form_submit_button("Upload", on_click=_take_token)
    secret = st.session_state.pop(_SECRET, "")  # never left in the session, whatever happens next
    del token
    if submitted:
        model_id = f"{owner.strip()}/{name}"
        if busy:
            st.error("a job is writing into this run: wait for it to finish (see Jobs above)")
        elif not dry_run and not secret.strip():
            st.error("no ModelScope token typed: paste an access token from modelscope.cn/my/myaccesstoken")
        elif jobs_panel.start(submission.parent, actions.upload_steps(submission, model_id, dry_run=dry_run,
                                                                      endpoint=endpoint.strip() or None, allow=allow),
                              f"Upload to {model_id}" + (" (dry run)" if dry_run else ""),
                              env={"MODELSCOPE_API_TOKEN": secret} if secret else None):
            del secret
            st.rerun()


def render(ctx: Context) -> None:
    st.header("Package")
    run = RunDir(ctx.run)
    busy = jobs_panel.panel(run.root)
    team = st.text_input("Team name", key="pkg_team")
    suffix = st.text_input("Suffix", key="pkg_suffix")
    name = _name(team, suffix)
    description = st.text_area("Description (the model card's text)", key="pkg_description")
    scores = run_access.read_json(run.scores, "the scores", "kstory score")
    gate = (scores.data or {}).get("summary", {}).get("gate") if scores.ok else None
    if not scores.ok:
        st.warning(scores.problem)
    elif gate != "pass":
        st.warning(f"the score gate did not pass (gate: {gate}); tick the box below to package anyway")
    allow = st.checkbox("Package even though the gate failed", value=False, key="pkg_allow_failed")
    allow_test = st.checkbox("Package a test artefact (tiny or random-weight models; labelled as such)", value=False,
                             key="pkg_allow_test")
    if st.button("Build package", key="pkg_build", type="primary", disabled=name is None or busy,
                 help="runs as a job: it goes on if this page is closed"):
        steps = actions.build_steps(run.root, team=team, suffix=suffix, description=description,
                                    allow_failed_gate=allow, allow_test_model=allow_test)
        if jobs_panel.start(run.root, steps, "Build the package (export the LoRA, copy the frames, hash)"):
            st.rerun()
    card = run.submission / "README.md"
    if card.is_file():
        st.subheader("Model card preview")
        front, body = card_preview(run.submission, card.read_text(encoding="utf-8", errors="replace"))
        if front:
            with st.expander("front matter"):
                st.code(front, language="yaml")
        with st.container(border=True):
            st.markdown(body, unsafe_allow_html=False)
        index = run_access.read_json(run.submission / "kstory_package.json", "the package index", "kstory package")
        built_name = (index.data or {}).get("model_name") if index.ok else None
        if st.button("Verify the package", key="pkg_verify", disabled=busy,
                     help="regenerate every frame from the package alone and compare (kstory verify)"):
            with guarded():
                if jobs_panel.start(run.root, actions.verify_steps(run.root), "Verify the package"):
                    st.rerun()
        if built_name:
            _upload(run.submission, built_name, index.data, busy)
        else:
            st.warning(index.problem or "the package index names no model")
    else:
        st.info("no package yet: build it above")
