"""The walkthrough notebook runs top to bottom against the current API."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "kstory_walkthrough.ipynb"


@pytest.mark.slow
def test_walkthrough_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, cell in enumerate(cells):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        try:
            exec(compile(source, f"{NOTEBOOK.name}[cell {index}]", "exec"), namespace)
        except Exception as exc:  # noqa: BLE001 - report which cell broke
            pytest.fail(f"cell {index} failed: {type(exc).__name__}: {exc}")
    run = tmp_path / "runs" / "notebook"
    assert (run / "data" / "train" / "metadata.csv").is_file()
    assert (run / "data" / ".kstory-stage.json").is_file()
    assert namespace["image"].size == (128, 128)
    assert len(namespace["frames"]) == 8
    assert (run / "scores.json").is_file() and namespace["scores"]["summary"]["count"] == 8
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
