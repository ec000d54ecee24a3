"""Packaging a demo run, verifying it by regeneration, and the bad inputs of both."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

import kstory  # noqa: F401
from kstory.core.errors import KstoryError
from kstory.submissions import build_package, validate_model_name, verify_package
from kstory.submissions.naming import MIDDLE
from kstory.submissions.package import PACKAGE_FILE, check_files

TEAM, SUFFIX = "kteam", "watercolour-fox"


def make_quick_run(run: Path) -> Path:
    """A run directory as the pipeline writes it, minus prep and training (the slow part of ``run_demo``).

    The LoRA is the tiny UNet's peft factors with random values (written by
    kstory's own ``save_lora``); the story and scores come from the real
    ``generate_story`` (the demo's spec, tiny ControlNets) and ``score_images``.
    """
    from kstory.cli.demo import DEMO_TRIGGER
    from kstory.story import build_tiny_controlnets, generate_story, make_demo_spec

    lora = write_quick_lora(run)
    spec = make_demo_spec(run / "inputs" / "story.yaml", DEMO_TRIGGER)
    tiny = build_tiny_controlnets()
    generate_story(spec, run / "story", model="tiny", lora=lora,
                   controlnets={"pose": tiny["pose"], "union": tiny["union"]}, device="cpu")
    score_story(run)
    return run


def write_quick_lora(run: Path) -> Path:
    """``run/lora/lora.safetensors``: the tiny UNet's peft factors with random values, as training writes them."""
    import torch

    from kstory.cli.demo import DEMO_TRIGGER
    from kstory.core.models import resolve_model
    from kstory.core.models.tiny import load_tiny_models
    from kstory.train.lora_io import build_metadata, inject_lora, lora_state_dict, save_lora

    weights = resolve_model("tiny")
    unet = load_tiny_models(weights)["sdxl_unet"]
    targets = ["to_q", "to_k", "to_v", "to_out"]
    inject_lora(unet, 4, 4.0, targets, seed=0)
    g = torch.Generator().manual_seed(3)
    state = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in lora_state_dict(unet).items()}
    return save_lora(run / "lora" / "lora.safetensors", state, build_metadata(
        rank=4, alpha=4.0, target_modules=targets, base_model=weights.identity,
        base_fingerprint=weights.fingerprint, trigger_word=DEMO_TRIGGER, training_config="{}", step=12))


def score_story(run: Path) -> Path:
    """``run/scores.json`` for the frames of ``run/story`` (the tiny scorers)."""
    from kstory.scoring import score_images

    manifest = json.loads((run / "story" / "manifest.json").read_text())
    frames = [run / "story" / f["file"] for _, f in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0]))]
    prompts = {Path(f["file"]).name: f["prompt"] for f in manifest["frames"].values()}
    score_images(frames, aesthetic_model="tiny", clip_model="tiny", prompts=prompts, out=run / "scores.json")
    return run / "scores.json"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Set KSTORY_FULL_DEMO=1 to package a complete ``run_demo`` run instead (minutes on a small CPU)."""
    run = tmp_path_factory.mktemp("runs") / "demo"
    if os.environ.get("KSTORY_FULL_DEMO") == "1":
        from kstory.cli.demo import run_demo

        run_demo(run)
        return run
    return make_quick_run(run)


@pytest.fixture(scope="module")
def package(demo) -> Path:
    # Tiny random-weight models: a test artefact whose gate fails, so packaging needs both overrides.
    return build_package(demo, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)


def _copy_run(demo: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for part in ("lora/lora.safetensors", "story", "scores.json"):
        source, dest = demo / part, target / part
        dest.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copyfile)(source, dest)
    if (demo / "lora" / "train.json").is_file():
        (target / "lora" / "train.json").write_text((demo / "lora" / "train.json").read_text())
    return target


def test_package_is_a_modelscope_model_repo(package: Path, demo: Path):
    assert package == demo / "submission"
    for name in ("README.md", "configuration.json", "lora.safetensors", "pytorch_lora_weights.safetensors",
                 "lora_kohya.safetensors", "story.yaml", "manifest.json", "scores.json", "forum_post.md", PACKAGE_FILE):
        assert (package / name).is_file(), name
    assert len(list((package / "frames").glob("*.png"))) == 8
    assert len(list((package / "guides").glob("*.png"))) == 8
    readme = (package / "README.md").read_text(encoding="utf-8")
    front = readme.split("---")[1]
    for needle in ("frameworks:", "license:", "tags:", "- text-to-image-synthesis", '- "kstory/tiny-kolors@'):
        assert needle in front, needle
    assert "Kwai-Kolors/Kolors" not in front and "test-artefact" in front
    assert "TEST ARTEFACT: this is not a Kolors LoRA" in readme
    assert "kstory style" in readme and "lora_alpha=" in readme and "KolorsImagePipeline" in readme
    manifest = json.loads((package / "manifest.json").read_text())
    table = [line for line in readme.splitlines() if line.startswith("| ") and "frames/" in line]
    assert len(table) == 8
    for line, frame in zip(table, sorted(manifest["frames"].values(), key=lambda f: f["file"])):
        assert str(frame["seed"]) in line and frame["frame_prompt"] in line
    config = json.loads((package / "configuration.json").read_text())
    assert config["task"] == "text-to-image-synthesis"
    assert config["test_artefact"] is True and config["base_model"].startswith("kstory/tiny-kolors@")
    assert any("random-weight" in reason for reason in config["test_reasons"])
    index = json.loads((package / PACKAGE_FILE).read_text())
    assert index["model_name"] == f"{TEAM}-{MIDDLE}-{SUFFIX}"
    assert f"{TEAM}-{MIDDLE}-{SUFFIX}" in (package / "forum_post.md").read_text(encoding="utf-8").splitlines()[0]
    assert check_files(package) == []


def test_packaged_lora_exports_load_in_diffusers_and_kohya_reader(package: Path):
    from kstory.core.models import resolve_model
    from kstory.submissions.lora_export import FILE_NAMES
    from kstory.submissions.parity import export_parity

    exports = {fmt: package / name for fmt, name in FILE_NAMES.items()}
    result = export_parity(package / "lora.safetensors", exports, resolve_model("tiny"))
    for fmt in ("diffusers", "kohya"):
        assert result.injected[fmt] == result.modules
        assert not [m for m in result.warnings[fmt] if "led to unexpected keys" in m or "led to missing keys" in m]
        assert result.max_abs_diff[fmt] < 1e-4


def test_demo_package_verifies_as_identical(package: Path):
    report = verify_package(package)
    assert report.verdict == "identical", report.render()
    assert report.passed and len(report.frames) == 8 and all(f.identical for f in report.frames)
    assert report.scores_match is True


def test_edited_package_is_caught(package: Path, tmp_path: Path):
    copy = shutil.copytree(package, tmp_path / "submission")
    frame = copy / "frames" / "03.png"
    with Image.open(frame) as image:
        edited = image.convert("RGB")
    edited.putpixel((0, 0), (255, 0, 0))
    edited.save(frame)
    report = verify_package(copy, rescore=False)
    assert report.verdict == "modified" and not report.passed
    assert any("frames/03.png" in p and "sha256" in p for p in report.file_problems)
    third = report.frames[2]
    assert not third.identical and third.psnr is not None and third.psnr > 30 and 0.9 < third.ssim < 1.0
    assert all(f.identical for f in report.frames if f.index != 3)


def test_gate_failure_refuses_without_override(demo: Path, tmp_path: Path):
    run = _copy_run(demo, tmp_path / "failed")
    scores = json.loads((run / "scores.json").read_text())
    scores["summary"]["gate"] = "fail"
    (run / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(KstoryError, match="gate"):
        build_package(run, team=TEAM, suffix=SUFFIX, allow_test_model=True)
    assert not (run / "submission").exists()
    scores["summary"]["gate"] = "pass"
    (run / "scores.json").write_text(json.dumps(scores))
    assert (build_package(run, team=TEAM, suffix=SUFFIX, allow_test_model=True) / PACKAGE_FILE).is_file()


def test_bad_runs_are_refused(demo: Path, tmp_path: Path):
    short = _copy_run(demo, tmp_path / "short")
    (short / "story" / "frames" / "08.png").unlink()
    with pytest.raises(KstoryError, match="at least 8"):
        build_package(short, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    no_lora = _copy_run(demo, tmp_path / "nolora")
    (no_lora / "lora" / "lora.safetensors").unlink()
    with pytest.raises(KstoryError, match="no LoRA"):
        build_package(no_lora, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    with pytest.raises(KstoryError, match="naming rule"):
        build_package(_copy_run(demo, tmp_path / "ok"), team="bad team", suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    assert not (tmp_path / "ok" / "submission").exists()


@pytest.mark.parametrize("name", [f"t-{MIDDLE}-s", f"队伍_1-{MIDDLE}-v1.0", f"me/a-b-{MIDDLE}-x-y"])
def test_valid_names(name: str):
    assert validate_model_name(name) == name


@pytest.mark.parametrize("name", ["team-kolors-x", f"-{MIDDLE}-x", f"t-{MIDDLE}-", f"t t-{MIDDLE}-x",
                                  f"t-{MIDDLE}-x--y", f"{'t' * 60}-{MIDDLE}-x"])
def test_invalid_names(name: str):
    with pytest.raises(KstoryError):
        validate_model_name(name)


def test_test_artefact_is_refused_without_the_flag(demo: Path, tmp_path: Path):
    run = _copy_run(demo, tmp_path / "tiny")
    with pytest.raises(KstoryError, match="test artefact") as caught:
        build_package(run, team=TEAM, suffix=SUFFIX, allow_failed_gate=True)
    assert "--allow-test-model" in caught.value.render() and "tiny random-weight" in caught.value.render()
    assert not (run / "submission").exists()


def test_provenance_tells_kolors_from_test_models():
    from kstory.submissions.provenance import provenance

    kolors = {"model": {"identity": "Kwai-Kolors/Kolors", "tiny": False}, "lora": {"base_model": "Kwai-Kolors/Kolors"}}
    real_scores = {"summary": {"models": {"aesthetic": {"identity": "challenge", "random_weights": False}}}}
    tiny_scores = {"summary": {"models": {"aesthetic": {"identity": "kstory/tiny-aesthetic", "random_weights": True}}}}
    assert not provenance(kolors, real_scores, "Kwai-Kolors/Kolors").is_test
    assert provenance(kolors, real_scores, "Kwai-Kolors/Kolors").base_model == "Kwai-Kolors/Kolors"
    scorer = provenance(kolors, tiny_scores, "Kwai-Kolors/Kolors")
    assert scorer.is_test and "kstory/tiny-aesthetic" in scorer.reasons[0]
    other = provenance(kolors, real_scores, "stabilityai/sdxl")
    assert other.is_test and "stabilityai/sdxl" in other.reasons[0]
    tiny = provenance({"model": {"identity": "kstory/tiny-kolors@abc", "tiny": True}}, real_scores, "kstory/tiny-kolors@abc")
    assert tiny.is_test and tiny.base_model == "kstory/tiny-kolors@abc"


def test_every_frame_must_be_scored(demo: Path, tmp_path: Path):
    run = _copy_run(demo, tmp_path / "unscored")
    scores = json.loads((run / "scores.json").read_text())
    scores["images"] = [i for i in scores["images"] if Path(i["file"]).name != "05.png"]
    (run / "scores.json").write_text(json.dumps(scores))
    with pytest.raises(KstoryError, match="does not score frame") as caught:
        build_package(run, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    assert "scores.json" in caught.value.render() and f"kstory score {run}" in caught.value.render()


@pytest.mark.parametrize("where", ["frame", "guide", "absolute"])
def test_manifest_paths_cannot_leave_the_story_folder(demo: Path, tmp_path: Path, where: str):
    run = _copy_run(demo, tmp_path / "escape")
    manifest_path = run / "story" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    outside = tmp_path / "outside.png"
    shutil.copyfile(run / "story" / "frames" / "01.png", outside)
    evil = str(outside) if where == "absolute" else "../../outside.png"
    if where == "guide":
        manifest["frames"]["1"]["guides"][0]["file"] = evil
    else:
        manifest["frames"]["1"]["file"] = evil
    manifest_path.write_text(json.dumps(manifest))
    out = tmp_path / "pkg" / "deep" / "submission"
    with pytest.raises(KstoryError, match="outside the story folder"):
        build_package(run, team=TEAM, suffix=SUFFIX, out=out, allow_failed_gate=True, allow_test_model=True)
    assert not (tmp_path / "pkg").exists()


def test_card_snippet_uses_the_strength_the_frames_were_made_at(demo: Path, tmp_path: Path):
    run = _copy_run(demo, tmp_path / "scaled")
    manifest_path = run / "story" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["lora"]["scale"], manifest["lora"]["strength"] = 0.7, 0.7  # as `kstory story --lora-scale 0.7` records
    manifest_path.write_text(json.dumps(manifest))
    package = build_package(run, team=TEAM, suffix=SUFFIX, allow_failed_gate=True, allow_test_model=True)
    readme = (package / "README.md").read_text(encoding="utf-8")
    assert 'manager.load_lora("lora.safetensors", lora_alpha=0.7)' in readme
    assert json.loads((package / "configuration.json").read_text())["lora"]["strength"] == 0.7


def test_score_cli_takes_a_run_or_story_folder(demo: Path, tmp_path: Path):
    from kstory.cli import main

    run = _copy_run(demo, tmp_path / "scored")
    (run / "scores.json").unlink()
    status = main(["score", str(run / "story"), "--aesthetic-model", "tiny", "--device", "cpu"])
    assert status in (0, 3)  # the gate's verdict on random scores
    scores = json.loads((run / "scores.json").read_text())
    manifest = json.loads((run / "story" / "manifest.json").read_text())
    assert [Path(i["file"]).name for i in scores["images"]] == [f"{k:02d}.png" for k in range(1, 9)]
    assert all(i["prompt"] == manifest["frames"][str(n)]["prompt"] and i["clip_t"] is not None
               for n, i in enumerate(scores["images"], 1))
    assert "kstory score on" in (run / "kstory.log").read_text(encoding="utf-8")
    assert main(["score", str(run), "--aesthetic-model", "tiny", "--device", "cpu"]) == status  # the run folder too
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not an image")
    assert main(["score", str(notes), "--aesthetic-model", "tiny", "--device", "cpu"]) == 2  # nothing to score


def test_verify_cli_records_its_result_for_upload(package: Path, tmp_path: Path):
    from kstory.cli import main
    from kstory.submissions.verify_record import verify_status

    copy = shutil.copytree(package, tmp_path / "submission")
    assert verify_status(copy) == "missing"
    assert main(["verify", str(copy), "--no-rescore"]) == 0
    assert verify_status(copy) == "passed" and check_files(copy) == []
