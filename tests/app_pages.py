"""Open one dashboard page on a run with Streamlit's AppTest, as the page tests all do."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from kstory.cli.launch import RUN_ENV, RUNS_ROOT_ENV

MAIN = str(Path(__file__).resolve().parent.parent / "kstory" / "app" / "main.py")
TIMEOUT = 240


def app_ok(at: AppTest) -> AppTest:
    """``at`` after asserting the page raised nothing and showed no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def open_page(monkeypatch: pytest.MonkeyPatch, run: Path, page: str) -> AppTest:
    """The app on ``run`` with ``page`` chosen in the sidebar (nothing raised yet; errors are the caller's to judge)."""
    monkeypatch.setenv(RUNS_ROOT_ENV, str(run.parent))
    monkeypatch.setenv(RUN_ENV, run.name)
    at = AppTest.from_file(MAIN, default_timeout=TIMEOUT).run()
    at.sidebar.radio(key="page").set_value(page).run()
    assert not at.exception, [e.value for e in at.exception]
    return at
