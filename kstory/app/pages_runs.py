"""Runs page: pick a run in the runs root, or create a new one from the demo config."""

from __future__ import annotations

import streamlit as st

from kstory.core import run_access
from kstory.app.ui import Context, guarded


def _create(ctx: Context, name: str) -> None:
    """Make ``runs_root/name`` with the demo's config, dataset and story spec: a run `kstory run` can fill as is."""
    from kstory.cli.demo import prepare_demo_run

    name = run_access.new_run_name(name)
    target = run_access.resolve_run(ctx.runs_root, name)
    if target.exists():
        st.warning(f"{name} already exists; picked it")
    else:
        with st.spinner("writing a starter config with a generated dataset and story spec"):
            config = prepare_demo_run(target)
        st.success(f"created {target} with a starter config on the tiny test model (kstory.yaml, inputs/); "
                   f"fill it with `kstory run {config}`, or edit it first (docs/config.md)")
    st.session_state["run"] = target.name


def render(ctx: Context) -> None:
    st.header("Runs")
    st.caption(f"runs root: {ctx.runs_root}")
    runs = run_access.list_runs(ctx.runs_root)
    if runs:
        current = ctx.run.name if ctx.run is not None and ctx.run.name in runs else None
        choice = st.selectbox("Run", runs, index=runs.index(current) if current else None, key="run_pick",
                              placeholder="pick a run")
        if choice and choice != (ctx.run.name if ctx.run else None):
            st.session_state["run"] = choice
            st.rerun()
    else:
        st.info("no runs in the runs root yet: create one below, or run `kstory demo`")
    typed = st.text_input("Open a run by name or path (inside the runs root)", key="run_typed")
    if st.button("Open", key="run_open") and typed:
        with guarded():
            target = run_access.resolve_run(ctx.runs_root, typed)
            if not target.is_dir():
                st.error(f"no run folder {target.name} in the runs root")
            else:
                st.session_state["run"] = str(target.relative_to(ctx.runs_root.resolve()))
                st.rerun()
    with st.form("new_run"):
        name = st.text_input("New run name", key="new_run_name")
        if st.form_submit_button("Create run"):
            with guarded():
                _create(ctx, name)
    if ctx.run is not None:
        st.subheader(f"Run: {ctx.run.name}")
        status = run_access.overview(ctx.run)
        for item, present in status.present.items():
            st.write(("✅ " if present else "❌ missing: ") + item)
