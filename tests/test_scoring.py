"""kstory score on the tiny models: report, gate, table, bad input (parity lives in test_scoring_parity.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import kstory.scoring as scoring
from kstory.core.errors import KstoryError
from kstory.scoring import GATE_FAILED_EXIT, PASS_EXIT, exit_status, load_prompts, render_table, score_images
from kstory.scoring.report import ImageScore, summarise
from kstory.scoring.tiny import TINY_MARKER, cached_tiny


def _frame(rng: np.random.Generator, size=(256, 256)) -> Image.Image:
    base = rng.integers(0, 256, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("story")
    rng = np.random.default_rng(0)
    for i in range(8):
        _frame(rng).save(folder / f"frame_{i}.png")
    return folder


@pytest.fixture(scope="module")
def story_report(story: Path, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "scores.json"
    prompts = {f"frame_{i}.png": f"frame {i} of a watercolour fox story" for i in range(8)}
    return score_images([story], prompts=prompts, out=out), out


def test_tiny_models_are_cached_in_the_published_formats():
    predictor, clip = cached_tiny("aesthetic"), cached_tiny("clip")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "vocab.json", TINY_MARKER} <= {
        p.name for p in predictor.iterdir()}
    assert json.loads((predictor / "config.json").read_text())["architectures"] == ["AestheticsPredictorV2Linear"]
    assert {"open_clip_config.json", "open_clip_model.safetensors"} <= {p.name for p in clip.iterdir()}
    assert cached_tiny("aesthetic") == predictor  # built once


def test_scores_json_schema_and_loud_warning(story_report):
    report, out = story_report
    data = json.loads(out.read_text())
    assert data == report.to_json()
    assert data["schema"] == "kstory.scores/1" and data["complete"] is True
    image = data["images"][0]
    assert set(image) == {"file", "sha256", "width", "height", "mode", "aesthetic", "prompt", "clip_t",
                          "clip_i_to_others", "dreamsim_to_others"}
    assert image["sha256"] == __import__("hashlib").sha256(Path(image["file"]).read_bytes()).hexdigest()
    assert all(entry["clip_t"] is not None and entry["clip_i_to_others"] is not None for entry in data["images"])
    summary = data["summary"]
    for key in ("mean", "min", "gate", "threshold", "passed", "weakest", "clip_i_mean", "odd_one_out", "models"):
        assert key in summary
    for role in ("aesthetic", "clip"):
        model = summary["models"][role]
        assert model["random_weights"] is True and len(next(iter(model["files"].values()))) == 64
    assert summary["models"]["clip"]["quick_gelu"] is True
    assert any("random weights" in w and "mean nothing" in w for w in data["warnings"])
    assert abs(summary["mean"] - sum(i["aesthetic"] for i in data["images"]) / 8) < 1e-9


def test_tiny_scores_differ_between_frames_and_do_not_depend_on_batching(story: Path, story_report):
    report, _ = story_report
    one_by_one = score_images([story], clip_model=None, batch_size=1)
    assert max(abs(a.aesthetic - b.aesthetic) for a, b in zip(report.images, one_by_one.images)) < 1e-5
    spread = max(i.aesthetic for i in report.images) - min(i.aesthetic for i in report.images)
    assert spread > 0.05


def test_gate_threshold_weakest_and_what_the_mean_misses(story: Path, story_report):
    report, _ = story_report
    high = score_images([story], clip_model=None, threshold=report.mean + 0.5)
    assert not high.passed and high.summary.gate == "fail" and exit_status(high) == GATE_FAILED_EXIT
    assert high.summary.missing_by == pytest.approx(0.5)
    weakest = min(high.images, key=lambda i: i.aesthetic)
    assert high.summary.weakest[0].file == weakest.file
    assert high.summary.replace_weakest_needs == pytest.approx(weakest.aesthetic + 8 * 0.5)
    low = score_images([story], clip_model=None, threshold=report.mean - 0.5)
    assert low.passed and exit_status(low) == PASS_EXIT and low.summary.missing_by == 0
    assert low.summary.replace_weakest_needs is None
    edge = score_images([story], clip_model=None, threshold=report.mean)
    assert edge.passed  # "at least the threshold"


def test_table_names_weak_frames_odd_one_out_and_the_gate(story: Path, story_report):
    report, _ = story_report
    table = render_table(report)
    assert "frame_0.png" in table and f"gate: {report.summary.gate.upper()}" in table and "mean nothing" in table
    assert "odd one out" in table.splitlines()[1 + [Path(i.file).name for i in report.images].index(
        Path(report.summary.odd_one_out).name)]
    failing = render_table(score_images([story], clip_model=None, threshold=report.mean + 0.25))
    assert "gate: FAIL" in failing and "misses by 0.2500" in failing and "vs gate" in failing
    assert "gate: PASS" in render_table(score_images([story], clip_model=None, threshold=report.mean - 0.25))
    hopeless = render_table(score_images([story], clip_model=None, threshold=report.mean + 2))
    assert "no single new frame is enough: the scores must rise by 16.000" in hopeless


def test_bad_files_are_skipped_and_reported_with_scores_kept(tmp_path: Path):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(1)
    _frame(rng).save(folder / "rgb.png")
    _frame(rng, (120, 90)).convert("L").save(folder / "gray.png")
    _frame(rng).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    _frame(rng).convert("RGBA").save(folder / "rgba.png")
    good = (folder / "rgb.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    (folder / "notes.txt").write_text("prompt ideas")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "sub").mkdir()  # folders are not read, as in the organisers' loop
    report = score_images([folder], clip_model=None, out=tmp_path / "scores.json")
    assert sorted(Path(i.file).name for i in report.images) == ["gray.png", "palette.png", "rgb.png", "rgba.png"]
    assert {Path(i.file).name: i.mode for i in report.images}["palette.png"] == "P"
    reasons = {Path(s.file).name: s.reason for s in report.skipped}
    assert set(reasons) == {"truncated.png", "notes.txt", ".DS_Store"}
    assert "truncated" in reasons["truncated.png"] and reasons["notes.txt"] == "not an image PIL can read"
    assert report.summary.skipped == 3 and any("would crash" in w for w in report.warnings)
    assert json.loads((tmp_path / "scores.json").read_text())["summary"]["count"] == 4
    assert "notes.txt" in render_table(report)


def test_only_unreadable_files_fail_the_gate_but_write_the_report(tmp_path: Path):
    (tmp_path / "a.txt").write_text("x")
    report = score_images([tmp_path / "a.txt"], clip_model=None, out=tmp_path / "scores.json")
    assert report.mean is None and not report.passed and report.summary.count == 0
    assert "no image could be scored" in render_table(report)
    assert json.loads((tmp_path / "scores.json").read_text())["skipped"][0]["file"].endswith("a.txt")


def test_empty_folder_and_missing_path_are_user_errors(tmp_path: Path):
    with pytest.raises(KstoryError, match="no files to score"):
        score_images([tmp_path], clip_model=None)
    with pytest.raises(KstoryError, match="no such file"):
        score_images([tmp_path / "nope"], clip_model=None)


def _broken_copy(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(cached_tiny("aesthetic"), folder)
    return folder


def test_predictor_folders_of_the_wrong_format_are_refused_before_scoring(story: Path, tmp_path: Path):
    no_config = _broken_copy(tmp_path, "no-config")
    (no_config / "config.json").unlink()
    wrong_arch = _broken_copy(tmp_path, "wrong-arch")
    config = json.loads((wrong_arch / "config.json").read_text())
    (wrong_arch / "config.json").write_text(json.dumps({**config, "architectures": ["AestheticsPredictorV1"]}))
    no_head = _broken_copy(tmp_path, "no-head")
    weights = load_file(no_head / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("layers.")}, no_head / "model.safetensors")
    wrong_width = _broken_copy(tmp_path, "wrong-width")
    (wrong_width / "config.json").write_text(json.dumps({**config, "projection_dim": 32}))
    no_weights = _broken_copy(tmp_path, "no-weights")
    (no_weights / "model.safetensors").unlink()
    cases = {no_config: "no config.json", wrong_arch: "AestheticsPredictorV1", no_head: "MLP head",
             wrong_width: "could not load|do not fit", no_weights: "no weights", tmp_path / "x.json": "not an aesthetic"}
    (tmp_path / "x.json").write_text("{}")
    for folder, message in cases.items():
        out = tmp_path / f"{folder.name}.json"
        with pytest.raises(KstoryError, match=message) as caught:
            score_images([story], aesthetic_model=folder, clip_model=None, out=out)
        assert caught.value.fix and not out.exists()


def test_a_laion_head_of_the_wrong_width_is_refused(story: Path, tmp_path: Path):
    torch.save({"layers.0.weight": torch.zeros(1024, 768), "layers.0.bias": torch.zeros(1024)}, tmp_path / "bad.pth")
    with pytest.raises(KstoryError, match="MLP head"):
        score_images([story], aesthetic_model=tmp_path / "bad.pth", aesthetic_clip="tiny", clip_model=None)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(KstoryError, match="not a readable weights file"):
        score_images([story], aesthetic_model=tmp_path / "junk.pth", aesthetic_clip="tiny", clip_model=None)


def test_clip_specs_that_cannot_load_are_user_errors(story: Path, tmp_path: Path):
    for spec, message in ((tmp_path, "open_clip_config.json"), ("ViT-L-14", "names no weights"),
                          ("ViT-L-14:no-such-tag", "knows no weights")):
        with pytest.raises(KstoryError, match=message):
            score_images([story], clip_model=spec)


def test_prompts_files_and_unmatched_prompts(story: Path, tmp_path: Path):
    (tmp_path / "map.json").write_text(json.dumps({"frame_1.png": "a fox"}))
    (tmp_path / "list.json").write_text(json.dumps([{"file": "frame_1.png", "prompt": "a fox"}]))
    assert load_prompts(tmp_path / "map.json") == load_prompts(tmp_path / "list.json") == {"frame_1.png": "a fox"}
    (tmp_path / "bad.json").write_text(json.dumps([{"file": "frame_1.png"}]))
    with pytest.raises(KstoryError, match="unexpected shape"):
        load_prompts(tmp_path / "bad.json")
    report = score_images([story], prompts={"frame_1.png": "a fox", "missing.png": "x"})
    assert [i.clip_t is not None for i in report.images].count(True) == 1
    assert any("missing.png" in w for w in report.warnings)


def test_dreamsim_asked_for_without_the_package_is_a_user_error(story: Path):
    import importlib.util

    if importlib.util.find_spec("dreamsim") is not None:
        pytest.skip("dreamsim is installed")
    with pytest.raises(KstoryError, match="pip install dreamsim"):
        score_images([story], clip_model=None, dreamsim=True)


def test_an_interrupted_run_is_never_a_pass():
    image = ImageScore(file="a.png", sha256="0" * 64, width=1, height=1, mode="RGB", aesthetic=9.0)
    summary = summarise([image], skipped=0, threshold=6.0, models={}, complete=False)
    assert summary.gate == "incomplete" and not summary.passed


def test_package_import_is_lazy():
    import subprocess
    import sys

    code = "import kstory.scoring as scoring, sys; assert 'torch' not in sys.modules; scoring.render_table; print('ok')"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    assert callable(scoring.build_tiny_clip_model)


def test_without_clip_weights_it_warns_scores_aesthetics_and_still_gates(story: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture):
    import logging

    caplog.set_level(logging.WARNING, logger="kstory")
    predictor = shutil.copytree(cached_tiny("aesthetic"), tmp_path / "predictor")
    (predictor / TINY_MARKER).unlink()  # a predictor not marked as the test model: `auto` asks for ViT-L-14:openai
    report = score_images([story], aesthetic_model=str(predictor))  # offline: those CLIP weights cannot download
    assert "scoring aesthetics only" in caplog.text
    assert set(report.summary.models) == {"aesthetic"} and report.summary.gate in ("pass", "fail")
    assert all(image.clip_t is None and image.aesthetic is not None for image in report.images)
    with pytest.raises(KstoryError, match="could not download"):  # a CLIP model the user names still fails loudly
        score_images([story], aesthetic_model=str(predictor), clip_model="ViT-L-14:openai")
