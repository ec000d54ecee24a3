"""`kstory run` carries package (with verify) and upload when the config has those sections; never uploads unasked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from kstory.cli.runner import run_config
from kstory.core.errors import KstoryError


def _statuses(outcomes) -> dict[str, str]:
    return {outcome.stage: outcome.status for outcome in outcomes}


@pytest.mark.slow
def test_run_packages_verifies_and_uploads_only_when_asked(demo_runs: Path, tmp_path: Path) -> None:
    run = Path(shutil.copytree(demo_runs / "demo", tmp_path / "demo"))
    config = run / "kstory.yaml"
    with pytest.raises(KstoryError, match="no upload: section"):
        run_config(config, upload=True)
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    data["package"] = {"team": "kteam", "suffix": "demo", "allow_failed_gate": True, "allow_test_model": True}
    data["upload"] = {"model_id": "someone/kteam-可图Kolors训练-demo", "dry_run": True}
    config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")

    first = _statuses(run_config(config))
    assert first == {"prep": "skipped", "train": "skipped", "story": "skipped", "score": "skipped",
                     "package": "ran", "upload": "not configured"}, first
    verdict = json.loads((run / "submission" / "verify.json").read_text(encoding="utf-8"))
    assert verdict["verdict"] == "identical", verdict
    assert not (run / "submission" / ".upload.json").exists()

    again = _statuses(run_config(config, upload=True))
    assert again["package"] == "skipped" and again["upload"] == "ran", again
    record = json.loads((run / "submission" / ".upload.json").read_text(encoding="utf-8"))
    assert record["dry_run"] is True and record["files"] > 10
    assert _statuses(run_config(config, upload=True))["upload"] == "skipped"

    data["package"]["description"] = "another description"  # a new package: built again, upload stale again
    config.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    third = _statuses(run_config(config))
    assert third["package"] == "ran" and third["upload"] == "not configured"
    assert any(p.name.startswith("submission") for p in (run / ".history").iterdir())
