"""End-to-end story generation on the tiny Kolors with tiny random ControlNets, on CPU at 64 px.

Everything runs through DiffSynth's real pipeline pieces; nothing is mocked
except, in one test, the denoiser raising out-of-memory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.generate import Session
from kstory.train import TrainSettings, read_lora, train_lora


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_spec(path: Path, items: list[dict], **top) -> Path:
    spec = {"title": "test story", "frame_count": len(items),
            "character": {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0}, **top, "frames": items}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def controlnets() -> dict[str, Path]:
    return story.build_tiny_controlnets()


@pytest.fixture(scope="module")
def demo(tmp_path_factory, controlnets):
    """The 8-frame demo spec at 64 px / 2 steps, generated once."""
    root = tmp_path_factory.mktemp("demo")
    spec = story.make_demo_spec(root / "spec" / "story.yaml", "kstory style", controlnets=controlnets, size=64, steps=2)
    return spec, story.generate_story(spec, root / "out", model="tiny")


def test_story_folder_layout_and_manifest(demo):
    spec, result = demo
    out = result.out_dir
    assert sorted(result.frames) == list(range(1, 9)) and result.generated == list(range(1, 9))
    assert (out / "story.yaml").read_bytes() == spec.read_bytes()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "kstory-story/1" and manifest["frame_count"] == 8
    assert manifest["model"]["identity"].startswith("kstory/tiny-kolors")
    assert manifest["sampler"]["name"] == "euler" and manifest["dtype"] == "float32"
    assert {"torch", "diffsynth", "transformers", "kstory"} <= set(manifest["versions"])
    assert {cn["kind"] for cn in manifest["controlnets"].values()} == {"kolors", "union"}
    for index, frame in manifest["frames"].items():
        image = out / frame["file"]
        assert frame["file"] == f"frames/{int(index):02d}.png" and sha256(image) == frame["sha256"]
        assert Image.open(image).size == (64, 64)
        assert frame["prompt"].startswith("kstory style, a small fox in a blue scarf")
        assert frame["seed_history"][0]["seed"] == frame["seed"]
        for guide in frame["guides"]:
            assert sha256(out / guide["file"]) == guide["sha256"]
    assert manifest["frames"]["1"]["guides"][0]["file"] == "guides/01-pose.png"
    assert manifest["frames"]["8"]["guides"][0]["file"] == "guides/08-canny.png"
    assert manifest["frames"]["5"]["batch"] == [5, 6, 7, 8]
    assert manifest["frames"]["1"]["batch"] == [1, 2] and manifest["frames"]["3"]["batch"] == [3, 4]
    assert manifest["frames"]["3"]["consistent_attention"]["bank"] == [1, 2]  # the demo shares attention
    assert "consistent_attention" not in manifest["frames"]["5"]


def test_same_spec_gives_bit_identical_frames(demo, tmp_path):
    spec, first = demo
    again = story.generate_story(spec, tmp_path / "again", model="tiny")
    assert again.frame_hashes == first.frame_hashes
    assert len(set(first.frame_hashes.values())) == 8


def test_changing_one_seed_changes_only_that_frame(demo, tmp_path):
    spec, first = demo
    data = yaml.safe_load(spec.read_text())
    data["frames"][2]["seed"] = 4242
    edited = tmp_path / "story.yaml"
    edited.write_text(yaml.safe_dump(data), encoding="utf-8")
    for name in ("story-reference.png", "story-character.png"):  # the canny guide's picture, the character's
        (tmp_path / name).write_bytes((spec.parent / name).read_bytes())
    changed = story.generate_story(edited, tmp_path / "out", model="tiny")
    assert [i for i in range(1, 9) if changed.frame_hashes[i] != first.frame_hashes[i]] == [3]


def test_reroll_touches_one_frame_keeps_history_and_matches_a_full_run(demo, tmp_path):
    spec, first = demo
    out = tmp_path / "story"
    story.generate_story(spec, out, model="tiny")
    stamps = {i: (out / f"frames/{i:02d}.png").stat().st_mtime_ns for i in range(1, 9)}
    rolled = story.reroll(out, 6, seed=777)
    assert rolled.generated == [6]
    assert [i for i in range(1, 9) if rolled.frame_hashes[i] != first.frame_hashes[i]] == [6]
    assert all((out / f"frames/{i:02d}.png").stat().st_mtime_ns == stamps[i] for i in range(1, 9) if i != 6)

    data = yaml.safe_load(spec.read_text())
    data["frames"][5]["seed"] = 777
    full_spec = tmp_path / "full.yaml"
    full_spec.write_text(yaml.safe_dump(data), encoding="utf-8")
    for name in ("story-reference.png", "story-character.png"):  # the canny guide's picture, the character's
        (tmp_path / name).write_bytes((spec.parent / name).read_bytes())
    full = story.generate_story(full_spec, tmp_path / "full", model="tiny", frames=[5, 6, 7, 8])
    assert full.frame_hashes[6] == rolled.frame_hashes[6]

    story.reroll(out, 6, prompt="dances in the rain")
    random_seed = story.reroll(out, 6)
    frame = json.loads((out / "manifest.json").read_text())["frames"]["6"]
    assert [entry["seed"] for entry in frame["seed_history"][:3]] == [1006, 777, 777]
    assert frame["seed_history"][2]["prompt"] == "dances in the rain"
    assert frame["prompt"].endswith("dances in the rain") and frame["seed"] not in (1006, 777)
    assert random_seed.frame_hashes[6] == frame["sha256"]


def test_partial_run_keeps_the_other_frames(demo, tmp_path):
    spec, first = demo
    out = tmp_path / "story"
    result = story.generate_story(spec, out, model="tiny", frames=[6])
    assert result.generated == [6] and list(result.frames) == [6]
    assert result.frame_hashes[6] == first.frame_hashes[6]  # its batch (5-8) was re-run as a whole
    assert not (out / "frames" / "05.png").exists()
    with pytest.raises(KstoryError, match="frames are numbered 1..8"):
        story.generate_story(spec, out, model="tiny", frames=[9])


def test_controlnet_scale_zero_equals_no_controlnet(tmp_path, controlnets):
    Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))[..., None].repeat(3, -1)).save(tmp_path / "ref.png")

    def run(name: str, scale: float | None) -> dict[int, str]:
        guides = [] if scale is None else [
            [{"type": "pose", "pose": "walking", "scale": scale}],
            [{"type": "canny", "image": "ref.png", "controlnet": "union", "scale": scale, "low_threshold": 10}],
        ]
        items = [{"prompt": "a walk", "seed": 5, "guides": guides[0] if guides else []},
                 {"prompt": "a house", "seed": 6, "guides": guides[1] if guides else []}]
        spec = write_spec(tmp_path / f"{name}.yaml", items)
        return story.generate_story(spec, tmp_path / name, model="tiny", controlnets=controlnets).frame_hashes

    plain = run("plain", None)
    assert run("zero", 0.0) == plain
    guided = run("guided", 1.0)
    assert guided[1] != plain[1] and guided[2] != plain[2]


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("lora-data")
    folder = data / "train"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file_name,text"]
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,ktrigger a red square")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    settings = TrainSettings(max_steps=2, resolution=64, checkpoint_every=0, learning_rate=5e-2, trigger_word="ktrigger")
    return train_lora(data, tmp_path_factory.mktemp("lora"), settings, model="tiny").lora_path


def test_lora_is_applied_recorded_and_checked(tmp_path, lora):
    items = [{"prompt": "a walk", "seed": 5}]
    spec = write_spec(tmp_path / "s.yaml", items, character={"description": "a fox"})
    plain = story.generate_story(spec, tmp_path / "plain", model="tiny")
    styled = story.generate_story(spec, tmp_path / "lora", model="tiny", lora=lora, lora_scale=0.5)
    assert styled.frame_hashes[1] != plain.frame_hashes[1]
    manifest = json.loads((tmp_path / "lora" / "manifest.json").read_text())
    assert manifest["lora"]["sha256"] == sha256(lora) and manifest["lora"]["scale"] == 0.5
    assert manifest["lora"]["strength"] == pytest.approx(0.5 * manifest["lora"]["alpha"] / manifest["lora"]["rank"])
    assert manifest["frames"]["1"]["prompt"] == "ktrigger, a fox, a walk"  # the LoRA's trigger word

    tensors, metadata = read_lora(lora)
    foreign = tmp_path / "foreign.safetensors"
    save_file(tensors, str(foreign), metadata={**metadata, "kstory.base_model": "Kwai-Kolors/Kolors",
                                               "kstory.base_fingerprint": "f" * 64})
    with pytest.raises(KstoryError, match="trained on Kwai-Kolors/Kolors") as info:
        story.generate_story(spec, tmp_path / "foreign", model="tiny", lora=foreign)
    assert "--model" in info.value.fix


def test_unknown_controlnet_name_and_layout(tmp_path, controlnets):
    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1, "guides": [{"type": "pose", "pose": "sitting"}]}])
    with pytest.raises(KstoryError, match="guides use ControlNet\\(s\\) pose but none was given"):
        story.generate_story(spec, tmp_path / "a", model="tiny")
    bogus = tmp_path / "bogus.safetensors"
    save_file({"weight": torch.zeros(1)}, str(bogus))
    with pytest.raises(KstoryError, match="unknown layout"):
        story.generate_story(spec, tmp_path / "b", model="tiny", controlnets={"pose": bogus})


def test_out_of_memory_names_the_knobs(tmp_path, controlnets, monkeypatch):
    def exhausted(self, batch, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(Session, "denoise", exhausted)
    spec = write_spec(tmp_path / "s.yaml", [{"prompt": "x", "seed": 1}, {"prompt": "y", "seed": 2}])
    with pytest.raises(KstoryError, match="ran out of memory generating frames 1, 2 \\(64x64") as info:
        story.generate_story(spec, tmp_path / "out", model="tiny")
    assert "batch_size" in info.value.fix and "release_text_encoder" in info.value.fix


def test_memory_short_profiles_hold_only_the_batchs_controlnets_and_make_the_same_frames(controlnets):
    """Profiles 12gb/8gb/cpu load a ControlNet for the batches that use it and free it for those that do not;
    the frames are bit for bit those of a profile that holds them all."""
    from dataclasses import replace

    from kstory.core.memory import _TABLE, MemoryPlan
    from kstory.core.models import resolve_model
    from kstory.story.controlnets import identify
    from kstory.story.generate import FramePlan, GuidePlan, batches
    from kstory.story.guides.pose import render_library_pose

    nets = {name: identify(name, controlnets[name]) for name in ("pose", "canny")}
    pose = render_library_pose("waving", 64, 64)
    edges = Image.fromarray(((np.indices((64, 64)).sum(axis=0) % 16 < 2) * 255).astype(np.uint8)).convert("RGB")
    guides = {"pose": GuidePlan("pose", "pose", "pose", 0.7, 0.0, 1.0, pose, "guides/p.png"),
              "canny": GuidePlan("canny", "canny", "canny", 0.6, 0.0, 1.0, edges, "guides/c.png")}
    uses = [["pose"], ["pose", "canny"], [], ["canny"]]  # frames 1..4, one per batch
    plans = [FramePlan(index=i, prompt=f"a fox, scene {i}", frame_prompt="", negative_prompt="blurry", seed=i,
                       width=64, height=64, steps=2, cfg_scale=5.0, guides=[guides[name] for name in names])
             for i, names in enumerate(uses, start=1)]
    cpu = MemoryPlan(profile="cpu", requested="cpu", reason="asked for", device="cpu", **_TABLE["cpu"])

    def session(plan: MemoryPlan) -> Session:
        made = Session.load(resolve_model("tiny"), lora=None, lora_scale=None, controlnets=nets, device="cpu",
                            torch_dtype=torch.bfloat16, memory=plan)
        made.encode(plans, "never")
        return made

    short = session(cpu)
    assert short.controlnets_per_batch
    held, frames = [], []
    for _, images, _ in short.generate(batches(plans, 1)):
        held.append(sorted(short.controlnets))
        frames += images
    assert held == [["pose"], ["canny", "pose"], [], ["canny"]]
    roomy = session(replace(cpu, profile="24gb"))  # the same settings, ControlNets held all along
    assert not roomy.controlnets_per_batch
    same = [image for _, images, _ in roomy.generate(batches(plans, 1)) for image in images]
    assert sorted(roomy.controlnets) == ["canny", "pose"]
    assert [np.asarray(a).tobytes() for a in frames] == [np.asarray(b).tobytes() for b in same]
    assert len({np.asarray(a).tobytes() for a in frames}) == 4  # the guides took effect


def test_session_frames_match_diffsynths_own_pipeline_call(controlnets):
    """The batched loop is DiffSynth's Kolors sampling: same frame as ``SDXLImagePipeline.__call__`` with the ControlNet."""
    from diffsynth.controlnets import Annotator, ControlNetUnit, MultiControlNetManager

    from kstory.core.models import load_kolors_pipeline, resolve_model
    from kstory.story.controlnets import identify
    from kstory.story.generate import FramePlan, GuidePlan, batches
    from kstory.story.guides.pose import render_library_pose

    pose = identify("pose", controlnets["pose"])
    session = Session.load(resolve_model("tiny"), lora=None, lora_scale=None, controlnets={"pose": pose},
                           device="cpu", torch_dtype=torch.float32)
    guide = render_library_pose("waving", 64, 64)
    plans = [FramePlan(index=i, prompt=f"a fox, scene {i}", frame_prompt="", negative_prompt="blurry", seed=i,
                       width=64, height=64, steps=3, cfg_scale=5.0,
                       guides=[GuidePlan("pose", "pose", "pose", 0.7, 0.0, 1.0, guide, "guides/x.png")])
             for i in (1, 2)]
    session.encode(plans, "never")
    ours = [image for _, images, _ in session.generate(batches(plans, 2)) for image in images]
    pipe = load_kolors_pipeline(resolve_model("tiny"), device="cpu", torch_dtype=torch.float32)  # DiffSynth's whole pipeline
    pipe.controlnet = MultiControlNetManager([ControlNetUnit(Annotator("none", device="cpu"), session.controlnets["pose"][1], 0.7)])
    for plan, image in zip(plans, ours):
        theirs = pipe(prompt=plan.prompt, negative_prompt="blurry", cfg_scale=5.0, height=64, width=64,
                      num_inference_steps=3, seed=plan.seed, controlnet_image=guide, progress_bar_cmd=lambda x: x)
        difference = np.abs(np.asarray(image, np.int16) - np.asarray(theirs, np.int16))
        assert difference.max() <= 1
