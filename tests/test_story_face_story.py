"""A face (Kolors IP-Adapter-FaceID-Plus) in a story: spec, frames, manifest, verify.

The tiny Kolors and the tiny random FaceID-Plus on the CPU at 64 px, 2 steps,
through the real DiffSynth pipeline and transformers' CLIP; the face is given
as an embedding and a crop (insightface is not installed here).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.spec import load_spec

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FRAMES = [{"prompt": "walks", "seed": 11}, {"prompt": "sits", "seed": 12}]


def write_spec(path: Path, items: list[dict], face: dict | None = None, reference: dict | None = None) -> Path:
    character = {"trigger_word": "kstory style", "description": "a woman", "negative_prompt": "blurry"}
    if face is not None:
        character["face"] = face
    if reference is not None:
        character["reference"] = reference
    spec = {"title": "face story", "frame_count": len(items), "character": character,
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0}, "frames": items}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def face_files(folder: Path) -> dict:
    rng = np.random.default_rng(8)
    np.save(folder / "face.npy", rng.standard_normal(512).astype(np.float32))
    Image.fromarray(rng.integers(0, 255, (90, 90, 3), dtype=np.uint8)).save(folder / "crop.png")
    return {"embedding": "face.npy", "crop": "crop.png", "adapter": "tiny"}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return story.generate_story(write_spec(root / "story.yaml", FRAMES), root / "out", model="tiny")


def test_face_changes_its_frames_scale_zero_is_bit_identical_and_recorded(tmp_path, plain):
    face = face_files(tmp_path)
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {**face, "frames": [2]})
    result = story.generate_story(spec, tmp_path / "out", model="tiny")
    assert np.array_equal(pixels(result.frames[1]), pixels(plain.frames[1]))  # frame 1 has no face
    assert not np.array_equal(pixels(result.frames[2]), pixels(plain.frames[2]))
    manifest = json.loads(result.manifest_path.read_text())
    entry = manifest["frames"]["2"]["face_id"]
    assert "face_id" not in manifest["frames"]["1"]
    assert entry["scale"] == 0.8 and entry["adapter"]["kind"] == "kolors-ip-adapter-faceid-plus"
    stored = np.load(result.out_dir / entry["embedding"]["file"])
    assert np.array_equal(stored, np.load(tmp_path / "face.npy"))
    assert (result.out_dir / entry["crop"]["file"]).read_bytes() == (tmp_path / "crop.png").read_bytes()
    assert manifest["face_adapter"]["tiny"] and manifest["face_adapter"]["sha256"] == entry["adapter"]["sha256"]
    assert story.generate_story(spec, tmp_path / "out", model="tiny").generated == []  # keys match: nothing remade
    (tmp_path / "zero").mkdir()
    zero = write_spec(tmp_path / "zero" / "story.yaml", FRAMES, {**face_files(tmp_path / "zero"), "scale": 0.0})
    result = story.generate_story(zero, tmp_path / "zero" / "out", model="tiny")
    for index in (1, 2):
        assert np.array_equal(pixels(result.frames[index]), pixels(plain.frames[index]))


def test_face_frames_are_deterministic_and_verify_regenerates_them(tmp_path):
    from kstory.submissions.verify import _package_face

    spec = write_spec(tmp_path / "story.yaml", FRAMES, face_files(tmp_path))
    first = story.generate_story(spec, tmp_path / "a", model="tiny")
    second = story.generate_story(spec, tmp_path / "b", model="tiny")
    assert first.frame_hashes == second.frame_hashes
    manifest = json.loads(first.manifest_path.read_text())
    package_spec = yaml.safe_load((first.out_dir / "story.yaml").read_text())
    _package_face(first.out_dir, manifest, package_spec)  # verify's rewrite: the story folder's copies, no adapter
    assert package_spec["character"]["face"]["embedding"].endswith("references/face.npy")
    (tmp_path / "face.npy").unlink()
    (tmp_path / "crop.png").unlink()
    rewritten = tmp_path / "package.yaml"
    rewritten.write_text(yaml.safe_dump(package_spec), encoding="utf-8")
    again = story.generate_story(rewritten, tmp_path / "c", model="tiny", face_adapter="tiny")
    assert again.frame_hashes == first.frame_hashes
    with pytest.raises(KstoryError, match="was made with a face .*not supported yet"):
        story.reroll(first.out_dir, 2, seed=99)


@pytest.mark.parametrize("face, reference, message", [
    ({"embedding": "face.npy"}, None, "give image \\(needs insightface\\), or both embedding and crop"),
    ({"image": "p.png", "crop": "crop.png"}, None, "give image, or embedding and crop, not both"),
    ({"embedding": "face.npy", "crop": "crop.png", "frames": [3]}, None, "character.face.frames.0: no frame 3"),
    ({"embedding": "face.npy", "crop": "crop.png", "scale": 2.5}, None, "character.face.scale: Input should be"),
    ({"embedding": "face.npy", "crop": "crop.png"}, {"image": "fox.png"}, "character.face and character.reference"),
])
def test_face_spec_errors_name_the_line(tmp_path, face, reference, message):
    with pytest.raises(KstoryError, match=message):
        load_spec(write_spec(tmp_path / "story.yaml", FRAMES, face, reference))


def test_bad_face_inputs_are_named(tmp_path, monkeypatch):
    face = face_files(tmp_path)
    np.save(tmp_path / "short.npy", np.zeros(128, np.float32))
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {**face, "embedding": "short.npy"})
    with pytest.raises(KstoryError, match=r"short.npy: the face embedding has shape \(128,\)"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {**face, "adapter": ""})
    with pytest.raises(KstoryError, match="needs the Kolors IP-Adapter-FaceID-Plus, and none was given"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tmp_path / "home"))
    Image.new("RGB", (64, 64)).save(tmp_path / "person.png")
    spec = write_spec(tmp_path / "story.yaml", FRAMES, {"image": "person.png", "adapter": "tiny"})
    with pytest.raises(KstoryError, match="needs insightface.*\n.*pip install insightface onnxruntime"):
        story.generate_story(spec, tmp_path / "out", model="tiny")
