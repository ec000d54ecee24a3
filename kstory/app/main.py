"""The Streamlit entry point: ``streamlit run kstory/app/main.py`` (``kstory app`` starts it, see kstory/cli/launch.py).

Settings come from the environment: ``KSTORY_APP_RUNS_ROOT`` (default ``runs``)
and ``KSTORY_APP_RUN`` (the run to open first, a name inside the runs root).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script by Streamlit from a source checkout: make `kstory` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import kstory  # noqa: E402,F401  (installs the torchvision import fix first)
import streamlit as st  # noqa: E402

from kstory.app import (pages_candidates, pages_character, pages_data, pages_package, pages_repair,  # noqa: E402
                        pages_runs, pages_story, pages_training)
from kstory.app.ui import Context, guarded  # noqa: E402
from kstory.cli.launch import RUN_ENV, RUNS_ROOT_ENV  # noqa: E402
from kstory.core import run_access  # noqa: E402
PAGES = {
    "Runs": pages_runs.render,
    "Data": pages_data.render,
    "Training": pages_training.render,
    "Story": pages_story.render,
    "Character": pages_character.render,
    "Repair": pages_repair.render,
    "Candidates": pages_candidates.render,
    "Package": pages_package.render,
}


def _context() -> Context:
    runs_root = Path(os.environ.get(RUNS_ROOT_ENV, "runs")).resolve()
    if "run" not in st.session_state:
        st.session_state["run"] = os.environ.get(RUN_ENV) or None
    run = None
    if st.session_state["run"]:
        with guarded():
            run = run_access.resolve_run(runs_root, st.session_state["run"])
            if not run.is_dir():
                st.error(f"run folder {run} does not exist")
                run = None
        if run is None:
            st.session_state["run"] = None
    return Context(runs_root=runs_root, run=run)


def main() -> None:
    st.set_page_config(page_title="kstory", page_icon="🖼️", layout="wide")
    ctx = _context()
    st.sidebar.title("kstory")
    st.sidebar.caption(f"run: {ctx.run.name if ctx.run else '(none)'}")
    page = st.sidebar.radio("Page", list(PAGES), key="page")
    if ctx.run is None and page != "Runs":
        st.header(page)
        st.info("pick a run on the Runs page first")
        return
    with guarded():
        PAGES[page](ctx)


if __name__ == "__main__":  # Streamlit (and AppTest) run the script as __main__
    main()
