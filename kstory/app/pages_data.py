"""Data page: kept and dropped samples from data/report.json, with why each was dropped, filtered by op."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import streamlit as st

from kstory.core import run_access
from kstory.app.ui import Context, show_image
from kstory.core.rundir import RunDir

PER_ROW = 6
PAGE_SIZE = 48


def _reason(sample: dict[str, Any]) -> str:
    op = sample.get("op", "?")
    parts = [f"dropped by {op} ({sample.get('stage', '?')})"]
    threshold = sample.get("threshold")
    if threshold:
        parts.append("threshold " + ", ".join(f"{k}={v}" for k, v in threshold.items()))
    measured = {k: v for k, v in (sample.get("measured") or {}).items() if not k.startswith("__")}
    if measured:
        parts.append("measured " + ", ".join(f"{k}={v}" for k, v in measured.items()))
    if sample.get("reason"):
        parts.append(str(sample["reason"]))
    return "; ".join(parts)


def _dataset_folder(report: dict[str, Any]) -> Path | None:
    """The input folder the report names (it may live outside the runs root): dropped samples are read from it."""
    source = report.get("source")
    if not isinstance(source, str) or "://" in source:
        return None
    folder = Path(source).absolute()  # `kstory prep` took a relative path from the working directory
    return folder if folder.is_dir() else None


def _image_of(run: RunDir, sample: dict[str, Any], dataset: Path | None = None) -> Path | None:
    """The kept file under data/, or a dropped sample's source inside the run folder or the report's dataset folder.

    Only ever read to show a thumbnail; nothing outside the runs root is written.
    """
    if sample.get("status") == "kept" and sample.get("output"):
        return run_access.inside(run.data, sample["output"])
    if sample.get("stage") == "pre-check":
        return None  # missing, corrupt or oversized files: nothing safe to show
    source = sample.get("source")
    if not source:
        return None
    found = run_access.inside(run.root, source)
    if found is None and dataset is not None:
        found = run_access.inside(dataset, source)
    return found


def _grid(run: RunDir, samples: list[dict[str, Any]], kept: bool, dataset: Path | None = None) -> None:
    shown = samples[:PAGE_SIZE]
    for start in range(0, len(shown), PER_ROW):
        columns = st.columns(PER_ROW)
        for column, sample in zip(columns, shown[start:start + PER_ROW]):
            with column:
                caption = sample.get("caption") or {}
                text = caption.get("final") if kept else caption.get("at_drop", caption.get("original"))
                show_image(_image_of(run, sample, dataset), caption=sample.get("id", "?"), size=160)
                if kept:
                    st.caption(str(text or ""))
                else:
                    st.caption(_reason(sample))
    if len(samples) > PAGE_SIZE:
        st.caption(f"showing {PAGE_SIZE} of {len(samples)}")


def render(ctx: Context) -> None:
    st.header("Data")
    run = RunDir(ctx.run)
    loaded = run_access.read_json(run.data / "report.json", "the prep report", "kstory prep")
    if not loaded.ok:
        st.warning(loaded.problem)
        return
    report = loaded.data
    samples = [s for s in report.get("samples", []) if isinstance(s, dict)]
    counts = report.get("counts", {})
    cols = st.columns(3)
    for col, key in zip(cols, ("input", "kept", "dropped")):
        col.metric(key, counts.get(key, "?"))
    dropped_by = report.get("dropped_by", {})
    if dropped_by:
        st.bar_chart(dropped_by, x_label="op", y_label="dropped")
    ops = sorted({s.get("op") for s in samples if s.get("status") == "dropped" and s.get("op")})
    chosen = st.multiselect("Filter dropped samples by op", ops, key="data_ops", placeholder="all ops")
    kept = [s for s in samples if s.get("status") == "kept"]
    dropped = [s for s in samples if s.get("status") == "dropped" and (not chosen or s.get("op") in chosen)]
    st.subheader(f"Dropped ({len(dropped)})")
    if dropped:
        _grid(run, dropped, kept=False, dataset=_dataset_folder(report))
    else:
        st.caption("nothing dropped" + (" by the chosen ops" if chosen else ""))
    st.subheader(f"Kept ({len(kept)})")
    _grid(run, kept, kept=True)
