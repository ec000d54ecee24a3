"""What every run page opens with: its header, the message its last action left, the run's jobs, the story."""

from __future__ import annotations

from typing import Any

import streamlit as st

from kstory.app import jobs_panel
from kstory.app.ui import Context
from kstory.core import run_access
from kstory.core.rundir import RunDir


def open_page(ctx: Context, title: str, message_key: str) -> tuple[RunDir, bool]:
    """Draw the header, the message an action left in ``message_key`` and the jobs panel; (the run, a job runs)."""
    st.header(title)
    message = st.session_state.pop(message_key, None)
    if message:
        st.success(message)
    run = RunDir(ctx.run)
    return run, jobs_panel.panel(run.root)


def read_story(run: RunDir) -> tuple[dict[str, Any], dict[str, dict[str, Any]]] | None:
    """(the story manifest, its frame records by number), or None with a warning that says what to run."""
    manifest = run_access.read_json(run.story / "manifest.json", "the story manifest", "kstory story")
    if not manifest.ok:
        st.warning(manifest.problem)
        return None
    records = {str(k): v for k, v in (manifest.data.get("frames") or {}).items() if isinstance(v, dict)}
    return manifest.data, records
