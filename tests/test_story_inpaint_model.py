"""The Kolors-Inpainting UNet (9 input channels) in DiffSynth: parity with diffusers, and wrong UNets refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from kstory.core.errors import KstoryError
from kstory.core.models import resolve_model
from kstory.core.models.tiny import TinyKolorsSpec
from kstory.story.inpaint_model import find_recorded_inpaint_model, load_inpaint_unet, resolve_inpaint_model
from kstory.story.tiny_inpaint import write_tiny_inpaint_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inpaint_dir(tmp_path_factory) -> Path:
    return write_tiny_inpaint_model(tmp_path_factory.mktemp("inpaint") / "Kolors-Inpainting")


@torch.no_grad()
def test_kstory_inpaint_unet_matches_diffusers_unet2dcondition_with_9_channels(inpaint_dir):
    from diffusers import UNet2DConditionModel
    from safetensors.torch import load_file

    model = resolve_inpaint_model(inpaint_dir)
    ours = load_inpaint_unet(model, "cpu", torch.float32)
    assert ours.conv_in.in_channels == 9 and type(ours).__name__ == "SDXLUNet"
    config = json.loads(model.config.read_text())
    theirs = UNet2DConditionModel(**config).eval()
    assert theirs.config.in_channels == 9
    theirs.load_state_dict(load_file(str(model.weights)), strict=True)
    spec = TinyKolorsSpec()
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 9, 16, 16, generator=g)
    sample[:, 4] = (sample[:, 4] > 0).float()  # the mask channel is binary, as the pipeline feeds it
    timestep = torch.tensor([700.0, 120.0])
    text = torch.randn(2, 7, spec.text_hidden_size, generator=g)
    pooled = torch.randn(2, spec.text_hidden_size, generator=g)
    time_ids = torch.tensor([[128.0, 128.0, 0.0, 0.0, 128.0, 128.0]] * 2)
    expected = theirs(sample, timestep, encoder_hidden_states=text,
                      added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    got = ours(sample, timestep, text, time_ids, pooled)
    assert got.shape == expected.shape == (2, 4, 16, 16)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= 1e-5 * scale
    # the extra channels matter: the comparison would catch a conv_in that ignored them
    changed = sample.clone()
    changed[:, 5:] = 0
    assert float((ours(changed, timestep, text, time_ids, pooled) - got).abs().max()) > 1e-3 * scale


def test_the_base_unet_is_refused_as_the_inpainting_model_and_the_reverse(inpaint_dir, tmp_path):
    base = resolve_model("tiny")
    with pytest.raises(KstoryError, match="base Kolors UNet .4 input channels., not Kolors-Inpainting") as error:
        resolve_inpaint_model(base.root)
    assert "diffusion_pytorch_model.safetensors" in str(error.value)
    # an inpainting UNet where the base UNet belongs
    wrong = tmp_path / "wrong-base"
    shutil.copytree(base.root, wrong)
    shutil.copy(inpaint_dir / "unet/diffusion_pytorch_model.safetensors", wrong / "unet/diffusion_pytorch_model.safetensors")
    with pytest.raises(KstoryError, match="9 input channels: it is Kolors-Inpainting's, not the base") as error:
        resolve_model(str(wrong))
    assert "--inpaint-model" in error.value.fix


def test_missing_or_other_inpainting_weights_are_named(inpaint_dir, tmp_path):
    with pytest.raises(KstoryError, match="does not exist"):
        resolve_inpaint_model(tmp_path / "nowhere")
    model = resolve_inpaint_model(inpaint_dir)
    assert model.fingerprint == resolve_inpaint_model(inpaint_dir / "unet").fingerprint  # the unet folder works too
    other = write_tiny_inpaint_model(tmp_path / "other", seed=8)
    assert resolve_inpaint_model(other).fingerprint != model.fingerprint
    record = {**model.record(), "spec": str(tmp_path / "moved-away")}
    assert find_recorded_inpaint_model(record, inpaint_dir).fingerprint == model.fingerprint
    with pytest.raises(KstoryError, match=f"UNet {model.fingerprint[:12]}.*moved-away") as error:
        find_recorded_inpaint_model(record, other)
    assert "--inpaint-model" in error.value.fix


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    import yaml

    import kstory.story as story

    root = tmp_path_factory.mktemp("inpaint-story")
    spec = {"title": "t", "frame_count": 2, "character": {"trigger_word": "kstory style", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 4, "cfg_scale": 5.0, "sampler": "euler"},
            "frames": [{"prompt": "a fox", "seed": 1}, {"prompt": "a cat", "seed": 2}]}
    (root / "story.yaml").write_text(yaml.safe_dump(spec), encoding="utf-8")
    story.generate_story(root / "story.yaml", root / "story", model="tiny")
    return root / "story"


@pytest.mark.parametrize("crop", [None, 8])
def test_inpaint_with_the_inpainting_unet_keeps_the_outside_and_regenerates_bit_identically(
        made, inpaint_dir, tmp_path, crop):
    import numpy as np
    from PIL import Image

    import kstory.story as story
    from kstory.story.repair import Repair
    from kstory.story.repair_frame import repair_frame

    out = tmp_path / "story"
    shutil.copytree(made, out)
    mask = np.zeros((64, 64), np.uint8)
    mask[16:32, 16:40] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    before = np.asarray(Image.open(out / "frames/01.png").convert("RGB"), dtype=int)
    result = repair_frame(out, 1, kind="inpaint", strength=1.0, seed=5, mask=tmp_path / "m.png", feather=4,
                          crop_padding=crop, inpaint_model=inpaint_dir)
    after = np.asarray(Image.open(result.frames[1]).convert("RGB"), dtype=int)
    outside = np.ones((64, 64), bool)
    outside[11:37, 11:45] = False  # the mask plus the feather (4) and one pixel
    assert np.array_equal(after[outside], before[outside])
    assert np.abs(after[16:32, 16:40] - before[16:32, 16:40]).mean() > 10
    record = json.loads((out / "manifest.json").read_text())["frames"]["1"]
    (repair,) = record["repairs"]
    model = resolve_inpaint_model(inpaint_dir)
    assert repair["inpaint_model"] == {"kind": "kolors-inpainting", "spec": str(inpaint_dir.resolve()),
                                       "fingerprint": model.fingerprint, "tiny": False}
    # the same repair by latent blending is another picture, and another key
    blended = tmp_path / "blended"
    shutil.copytree(made, blended)
    other = repair_frame(blended, 1, kind="inpaint", strength=1.0, seed=5, mask=tmp_path / "m.png", feather=4,
                         crop_padding=crop)
    assert other.frame_hashes[1] != result.frame_hashes[1]
    assert json.loads((blended / "manifest.json").read_text())["frames"]["1"]["key"] != record["key"]
    # replayed from the record (what verify does), with the model found at the given path by its fingerprint
    moved = tmp_path / "moved-inpainting"
    shutil.copytree(inpaint_dir, moved)
    repairs = {1: [Repair.from_record(r, out) for r in record["repairs"]]}
    repairs[1][0].inpaint_path = moved
    again = story.generate_story(out / "story.yaml", tmp_path / "regen", model="tiny", repairs=repairs)
    assert again.frame_hashes[1] == record["sha256"]


def test_inpaint_model_arguments_are_checked(made, inpaint_dir, tmp_path):
    from kstory.story.repair_frame import repair_frame

    out = tmp_path / "story"
    shutil.copytree(made, out)
    with pytest.raises(KstoryError, match="inpainting model is for inpainting"):
        repair_frame(out, 1, kind="img2img", strength=0.5, seed=1, inpaint_model=inpaint_dir)
    with pytest.raises(KstoryError, match="base Kolors UNet"):
        from PIL import Image

        Image.new("L", (64, 64), 255).save(tmp_path / "m.png")
        repair_frame(out, 1, kind="inpaint", strength=0.5, seed=1, mask=tmp_path / "m.png",
                     inpaint_model=resolve_model("tiny").root)
    assert not (out / "repairs").exists()  # nothing was written


@pytest.mark.slow
def test_package_records_the_inpainting_model_and_verify_needs_it(inpaint_dir, tmp_path):
    from test_submissions_package import SUFFIX, TEAM, make_quick_run

    from kstory.cli import main
    from kstory.submissions import verify_package

    run = make_quick_run(tmp_path / "run")
    model = tmp_path / "Kolors-Inpainting"
    shutil.copytree(inpaint_dir, model)
    from PIL import Image

    Image.new("L", (64, 64), 0).save(tmp_path / "m.png")
    width, height = Image.open(run / "story/frames/02.png").size
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, width // 2, height // 2))
    mask.save(tmp_path / "m.png")
    assert main(["inpaint", str(run / "story"), "2", "--mask", str(tmp_path / "m.png"), "--seed", "7",
                 "--strength", "0.8", "--inpaint-model", str(model)]) == 0
    assert main(["score", str(run), "--aesthetic-model", "tiny"]) in (0, 3)
    assert main(["package", str(run), "--team", TEAM, "--suffix", SUFFIX, "--allow-failed-gate",
                 "--allow-test-model"]) == 0
    index = json.loads((run / "submission/kstory_package.json").read_text())
    fingerprint = resolve_inpaint_model(model).fingerprint
    assert index["inpaint_models"] == [{"kind": "kolors-inpainting", "fingerprint": fingerprint, "tiny": False}]
    assert not any(name.endswith("diffusion_pytorch_model.safetensors") for name in index["files"])
    assert verify_package(run / "submission", model="tiny", rescore=False).verdict == "identical"
    elsewhere = tmp_path / "elsewhere"
    model.rename(elsewhere)
    with pytest.raises(KstoryError, match=f"Kolors-Inpainting UNet {fingerprint[:12]}") as error:
        verify_package(run / "submission", model="tiny", rescore=False)
    assert "--inpaint-model" in error.value.fix
    report = verify_package(run / "submission", model="tiny", rescore=False, inpaint_model=elsewhere)
    assert report.verdict == "identical", report.render()
