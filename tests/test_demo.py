"""`kstory demo` and `kstory run`: the whole pipeline offline, resumable, never overwriting."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from kstory.cli import main
from kstory.core.rundir import read_stamp


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_demo_produces_every_documented_file(demo_run: Path) -> None:
    assert (demo_run / "kstory.yaml").is_file()
    assert (demo_run / "kstory.log").read_text().count("prep: done") == 1
    rows = list(csv.DictReader((demo_run / "data" / "train" / "metadata.csv").open(encoding="utf-8")))
    assert rows and all((demo_run / "data" / "train" / row["file_name"]).is_file() for row in rows)
    assert all(row["text"].startswith("kstory style, ") for row in rows)
    report = json.loads((demo_run / "data" / "report.json").read_text())
    assert report["counts"]["kept"] == len(rows)
    assert read_stamp(demo_run / "data")["stage"] == "prep"
    lora = demo_run / "lora"
    assert (lora / "lora.safetensors").is_file() and (lora / "loss.csv").is_file()
    assert read_stamp(lora)["finished"] is True
    assert sorted(p.name for p in (lora / "validation").iterdir())
    manifest = json.loads((demo_run / "story" / "manifest.json").read_text())
    assert len(manifest["frames"]) == 8
    assert all((demo_run / "story" / frame["file"]).is_file() for frame in manifest["frames"].values())
    assert manifest["lora"]["sha256"]
    scores = json.loads((demo_run / "scores.json").read_text())
    assert scores["summary"]["count"] == 8 and scores["summary"]["gate"] in ("pass", "fail")


@pytest.mark.slow
def test_demo_walks_the_whole_path_to_a_verified_package(demo_run: Path) -> None:
    submission = demo_run / "submission"
    assert {"configuration.json", "README.md", "lora.safetensors", "pytorch_lora_weights.safetensors",
            "lora_kohya.safetensors", "verify.json"} <= {p.name for p in submission.iterdir()}
    assert len(list((submission / "frames").glob("*.png"))) == 8
    card = (submission / "README.md").read_text(encoding="utf-8")
    assert "Score gate not passed" in card and "TEST ARTEFACT" in card
    configuration = json.loads((submission / "configuration.json").read_text(encoding="utf-8"))
    assert configuration["score_gate"]["overridden"] is True and configuration["test_artefact"] is True
    assert json.loads((submission / "verify.json").read_text(encoding="utf-8"))["verdict"] == "identical"
    from PIL import Image

    with Image.open(demo_run / "story" / "contact_sheet.png") as sheet:
        assert sheet.size == (4 * 256, 2 * (256 + 40))


@pytest.mark.slow
def test_demo_again_prints_the_summary_and_skips_what_is_up_to_date(demo_run: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["demo", "--out", str(demo_run)]) == 0
    out = capsys.readouterr().out
    assert "would upload" in out and "kstory_package.json" in out  # the dry run lists every file
    for line in ("prep     skipped", "package  skipped", "upload   dry run", "contact_sheet.png",
                 f"kstory app {demo_run}"):
        assert line in out, out


@pytest.mark.slow
def test_reroll_keeps_story_and_rescores(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    frames = demo_run / "story" / "frames"
    before = {p.name: p.read_bytes() for p in frames.iterdir()}
    assert main(["reroll", str(demo_run / "story"), "3", "--seed", "4242"]) == 0
    after = {p.name: p.read_bytes() for p in frames.iterdir()}
    assert [name for name in before if before[name] != after[name]] == ["03.png"]
    capsys.readouterr()
    assert main(["run", str(demo_run / "kstory.yaml")]) == 0
    out = capsys.readouterr().out
    assert "story    skipped" in out and "score    ran" in out
    rescored = json.loads((demo_run / "scores.json").read_text())
    sha = {Path(image["file"]).name: image["sha256"] for image in rescored["images"]}
    import hashlib

    assert sha["03.png"] == hashlib.sha256(after["03.png"]).hexdigest()


@pytest.mark.slow
def test_interrupted_training_is_resumed_not_restarted(demo_run: Path) -> None:
    stamp_file = demo_run / "lora" / ".kstory-stage.json"
    stamp = json.loads(stamp_file.read_text())
    stamp_file.write_text(json.dumps({**stamp, "finished": False}))
    history = demo_run / ".history"
    before = sorted(p.name for p in history.iterdir()) if history.exists() else []
    assert main(["run", str(demo_run / "kstory.yaml")]) == 0
    after = sorted(p.name for p in history.iterdir()) if history.exists() else []
    assert after == before
    assert read_stamp(demo_run / "lora")["finished"] is True
    assert "train: resuming the unfinished output" in (demo_run / "kstory.log").read_text()


@pytest.mark.slow
def test_demo_again_skips_up_to_date_stages(demo_run: Path, capsys: pytest.CaptureFixture) -> None:
    before = (demo_run / "data" / "report.json").stat().st_mtime_ns
    assert main(["demo", "--out", str(demo_run)]) == 0
    assert "prep     skipped" in capsys.readouterr().out
    assert (demo_run / "data" / "report.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_changed_settings_rerun_and_keep_the_old_output(demo_run: Path) -> None:
    config_path = demo_run / "kstory.yaml"
    config = yaml.safe_load(config_path.read_text())
    config["prep"]["trigger_word"] = "inkwash"
    config_path.write_text(yaml.safe_dump(config))
    assert main(["run", str(config_path)]) == 0
    rows = list(csv.DictReader((demo_run / "data" / "train" / "metadata.csv").open(encoding="utf-8")))
    assert all(row["text"].startswith("inkwash, ") for row in rows)
    kept = [p for p in (demo_run / ".history").iterdir() if p.name.startswith("data-")]
    assert len(kept) == 1 and (kept[0] / "report.json").is_file()


@pytest.mark.slow
def test_unfinished_output_is_moved_aside_not_trusted(demo_run: Path) -> None:
    (demo_run / "data" / ".kstory-stage.json").unlink()
    history_before = len(list((demo_run / ".history").iterdir()))
    assert main(["run", str(demo_run / "kstory.yaml"), "--until", "prep"]) == 0
    assert read_stamp(demo_run / "data") is not None
    assert len(list((demo_run / ".history").iterdir())) == history_before + 1


def test_unknown_stage_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("name: x\nprep:\n  source: nowhere\n")
    assert main(["run", str(config), "--until", "paint"]) == 2
    assert "unknown stage 'paint'" in capsys.readouterr().err
