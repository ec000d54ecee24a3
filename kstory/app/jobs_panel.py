"""The run's background jobs on a page: start one, show progress and the log's tail, cancel; polls while one runs.

Long actions run as ``kstory.jobs`` jobs in their own processes, so a reload
or a new tab finds them again in ``RUN/.jobs/`` instead of losing them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from kstory.app.ui import show_error
from kstory.cli import jobs

FINISHED_SHOWN = 3
_WATCHED = "jobs_watched"  # ids this session saw running: when one ends, the whole page is drawn again


def start(run_root: Path, steps: list[dict[str, Any]], label: str, env: dict[str, str] | None = None) -> str | None:
    """Start a job (refused with a message while another one writes into the run); returns its id or None."""
    try:
        job_id = jobs.start(run_root, steps, label=label, env=env)
    except Exception as error:  # noqa: BLE001 - shown to the user
        show_error(error)
        return None
    st.session_state.setdefault(_WATCHED, []).append(job_id)
    return job_id


def _job(run_root: Path, job: dict[str, Any]) -> None:
    state, label, job_id = job.get("state"), job.get("label", ""), job["id"]
    progress = job.get("progress") or {}
    with st.container(border=True):
        if state in jobs.FINAL:
            text = f"{label}: {state}" + (f" ({job.get('finished_at')})" if job.get("finished_at") else "")
            if state == "done":
                st.success(text + (f" — {job['result']}" if job.get("result") else ""))
            elif state == "cancelled":
                st.warning(text + " — the run keeps its previous outputs")
            else:
                st.error(f"{text} — {job.get('error') or 'see the log'}")
            with st.expander("log"):
                st.code(jobs.log_tail(run_root, job_id) or "(empty)", language=None)
            return
        st.markdown(f"**{label}** · {state} · `{job.get('command', '')}`")
        st.progress(float(progress.get("fraction") or 0.0), text=str(progress.get("text") or state))
        st.code(jobs.log_tail(run_root, job_id, lines=8) or "(starting …)", language=None)
        if st.button("Cancel", key=f"cancel_{job_id}"):
            jobs.cancel(run_root, job_id, wait_s=3.0)
            st.rerun()


def _draw(run_root: Path) -> list[dict[str, Any]]:
    records = jobs.list_jobs(run_root)
    running = [job for job in records if job.get("state") not in jobs.FINAL]
    finished = [job for job in records if job.get("state") in jobs.FINAL][:FINISHED_SHOWN]
    if running or finished:
        st.subheader("Jobs")
    for job in running + finished:
        _job(run_root, job)
    return running


@st.fragment(run_every=1.0)
def _polled(run_root: Path) -> None:
    running = _draw(run_root)
    watched = st.session_state.setdefault(_WATCHED, [])
    ids = {job["id"] for job in running}
    watched.extend(job_id for job_id in ids if job_id not in watched)
    if any(job_id not in ids for job_id in watched):  # a job this page watched has ended: show its results
        st.session_state[_WATCHED] = [job_id for job_id in watched if job_id in ids]
        st.rerun(scope="app")


def panel(run_root: Path) -> bool:
    """The run's running jobs and the last finished ones; True while one runs (the page should not start another)."""
    if jobs.active(run_root):
        _polled(run_root)
        return True
    st.session_state[_WATCHED] = []
    _draw(run_root)
    return False
