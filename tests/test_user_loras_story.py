"""The user's own LoRAs through the whole path: `kstory story --lora`, manifest, re-roll, package, verify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kstory.cli import main
from kstory.core.errors import KstoryError

pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]


def _user_lora(path: Path) -> Path:
    """A kohya LoRA on every attention projection of the tiny UNet's level-1 blocks, in diffusers spelling."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for block in ("down_blocks_1_attentions_0", "down_blocks_1_attentions_1", "up_blocks_1_attentions_0"):
        for leaf, width in (("attn1_to_q", 64), ("attn1_to_k", 64), ("attn2_to_k", 32), ("attn1_to_out_0", 64)):
            key = f"lora_unet_{block}_transformer_blocks_0_{leaf}"
            tensors[f"{key}.lora_down.weight"] = torch.randn(2, width, generator=g) * 0.5
            tensors[f"{key}.lora_up.weight"] = torch.randn(64, 2, generator=g) * 0.5
            tensors[f"{key}.alpha"] = torch.tensor(1.0)
    tensors["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(2, 32)
    save_file(tensors, str(path), metadata={"ss_network_dim": "2", "ss_network_alpha": "1.0"})
    return path


def _hashes(story: Path) -> dict[str, str]:
    return {k: v["sha256"] for k, v in json.loads((story / "manifest.json").read_text())["frames"].items()}


def test_story_package_and_verify_with_a_users_lora(tmp_path: Path):
    from test_submissions_package import SUFFIX, TEAM, make_quick_run

    from kstory.core.lora_stack import LoraRequest
    from kstory.story import build_tiny_controlnets, generate_story, make_demo_spec
    from kstory.submissions import verify_package

    run = make_quick_run(tmp_path / "run")
    own = run / "lora" / "lora.safetensors"
    user = _user_lora(tmp_path / "style.safetensors")
    spec = make_demo_spec(tmp_path / "spec" / "story.yaml", "kstory style", size=64, steps=2)
    tiny = build_tiny_controlnets()
    args = ["story", str(spec), "--out", str(run / "story"), "--model", "tiny", "--lora", str(own),
            "--lora", f"{user}:0.7", "--controlnet", f"pose={tiny['pose']}", "--controlnet", f"union={tiny['union']}"]
    assert main(args) == 0
    manifest = json.loads((run / "story" / "manifest.json").read_text())
    (record,) = manifest["loras"]
    assert record["format"] == "kohya" and record["scale"] == 0.7 and record["modules"] == 12
    assert record["ignored"]["text_encoder"] == 1 and record["rank"] == 2 and record["alpha"] == 1.0
    assert manifest["lora"]["sha256"] and manifest["lora"]["path"] == str(own.resolve())
    without = generate_story(spec, tmp_path / "plain", model="tiny", lora=own, device="cpu",
                             controlnets={"pose": tiny["pose"], "union": tiny["union"]})
    assert set(_hashes(run / "story").values()).isdisjoint(without.frame_hashes.values())

    assert main(["reroll", str(run / "story"), "6", "--seed", "77"]) == 0  # finds the LoRA by its recorded hash
    assert main(["score", str(run), "--aesthetic-model", "tiny", "--clip-model", "tiny"]) in (0, 3)
    assert main(["package", str(run), "--team", TEAM, "--suffix", SUFFIX, "--allow-failed-gate",
                 "--allow-test-model"]) == 0
    submission = run / "submission"
    index = json.loads((submission / "kstory_package.json").read_text())
    assert index["loras"][0]["shipped"] is False and not (submission / "loras").exists()
    assert str(user) not in (submission / "manifest.json").read_text()  # the user's own paths stay home
    assert record["sha256"] in (submission / "README.md").read_text()
    with pytest.raises(KstoryError, match=f"style.safetensors \\(sha256 {record['sha256'][:12]}") as error:
        verify_package(submission, model="tiny", rescore=False)
    assert "--lora" in error.value.fix
    assert verify_package(submission, model="tiny", rescore=False, loras=[user]).verdict == "identical"

    # Its licence allows shipping: the package holds it and verifies from itself alone.
    before = _hashes(run / "story")
    generate_story(spec, run / "story", model="tiny", lora=own, device="cpu",
                   controlnets={"pose": tiny["pose"], "union": tiny["union"]},
                   loras=[LoraRequest(user, 0.7, "https://example.org/style", ship=True)])
    assert _hashes(run / "story") == before  # the licence flag changes no pixel
    assert main(["package", str(run), "--team", TEAM, "--suffix", SUFFIX, "--allow-failed-gate",
                 "--allow-test-model"]) == 0
    index = json.loads((submission / "kstory_package.json").read_text())
    assert index["loras"][0]["package_file"] == "loras/01-style.safetensors"
    assert index["loras"][0]["source"] == "https://example.org/style"
    user.unlink()
    assert verify_package(submission, model="tiny", rescore=False).verdict == "identical"
