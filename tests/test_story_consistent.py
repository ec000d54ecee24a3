"""Consistent self-attention across frames, on the tiny Kolors through DiffSynth's real UNet at 64 px.

Checks: off (or lending nothing) is today's frames bit for bit; on is deterministic and changes frames;
a re-roll reproduces a full run; the manifest records it; the hook keeps CFG halves apart; spec errors name
the line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import kstory.story as story
from kstory.core.errors import KstoryError
from kstory.story.consistent_attention import (AttentionBank, SharingSettings, attention_layers, lent_tokens,
                                               shared_attention)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["wakes up", "walks to town", "meets a friend", "reads a map", "runs for a train", "sits and reads"]


def write_spec(path: Path, sharing: dict | None = None, seeds: dict[int, int] | None = None) -> Path:
    frames = [{"prompt": prompt, "seed": (seeds or {}).get(i, 100 + i)} for i, prompt in enumerate(PROMPTS, start=1)]
    spec = {"title": "consistent", "frame_count": len(frames),
            "character": {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0},
            "generation": {"batch_size": 3, **({"consistent_attention": sharing} if sharing is not None else {})},
            "frames": frames}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


ON = {"share": 0.5, "identity_frames": [1, 2, 3], "start_step": 1}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    root = tmp_path_factory.mktemp("plain")
    return story.generate_story(write_spec(root / "story.yaml"), root / "out", model="tiny")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("shared")
    spec = write_spec(root / "story.yaml", ON)
    return spec, story.generate_story(spec, root / "out", model="tiny")


def test_lending_nothing_gives_todays_frames_bit_for_bit(plain, tmp_path):
    """share 0: the hooks run at every step and layer but add no token, so the frames are those of no option."""
    spec = write_spec(tmp_path / "story.yaml", {"share": 0.0, "identity_frames": [1, 2, 3], "start_step": 0})
    nothing = story.generate_story(spec, tmp_path / "out", model="tiny")
    assert nothing.frame_hashes == plain.frame_hashes


def test_sharing_is_deterministic_and_changes_the_frames(plain, shared, tmp_path):
    spec, first = shared
    again = story.generate_story(spec, tmp_path / "again", model="tiny")
    assert again.frame_hashes == first.frame_hashes
    assert all(first.frame_hashes[i] != plain.frame_hashes[i] for i in range(1, 7))
    # a frame outside `frames:` runs plain attention (in its own batch)
    partial = write_spec(tmp_path / "partial.yaml", {**ON, "frames": [4, 5]})
    result = story.generate_story(partial, tmp_path / "partial", model="tiny")
    manifest = json.loads((result.out_dir / "manifest.json").read_text())
    assert "consistent_attention" not in manifest["frames"]["6"]
    assert result.frame_hashes[4] == first.frame_hashes[4] and result.frame_hashes[5] == first.frame_hashes[5]


def test_manifest_records_the_sharing_and_keys_follow_the_settings(shared, tmp_path):
    spec, first = shared
    manifest = json.loads((first.out_dir / "manifest.json").read_text())
    identity, reader = manifest["frames"]["2"]["consistent_attention"], manifest["frames"]["5"]["consistent_attention"]
    assert identity["role"] == "identity" and identity["bank"] == [1, 3]
    assert reader == {"share": 0.5, "layers": ["up"], "start_step": 1, "end_step": None, "identity_frames": [1, 2, 3],
                      "readers": [4, 5, 6], "role": "reader", "bank": [1, 2, 3]}
    assert manifest["frames"]["4"]["batch"] == [4, 5, 6]
    other = write_spec(tmp_path / "story.yaml", {**ON, "share": 0.25})
    changed = story.generate_story(other, tmp_path / "out", model="tiny")
    again = json.loads((changed.out_dir / "manifest.json").read_text())
    assert all(again["frames"][k]["key"] != manifest["frames"][k]["key"] for k in manifest["frames"])


def test_reroll_of_a_reader_reproduces_a_full_run_bit_for_bit(shared, tmp_path):
    spec, first = shared
    out = tmp_path / "story"
    story.generate_story(spec, out, model="tiny")
    same = story.reroll(out, 5, seed=105)
    assert same.frame_hashes == first.frame_hashes  # its own seed again: the same pixels
    rolled = story.reroll(out, 5, seed=999)
    full = story.generate_story(write_spec(tmp_path / "full.yaml", ON, seeds={5: 999}), tmp_path / "full", model="tiny")
    assert rolled.frame_hashes[5] == full.frame_hashes[5] != first.frame_hashes[5]
    assert [i for i in range(1, 7) if rolled.frame_hashes[i] != first.frame_hashes[i]] == [5]
    with pytest.raises(KstoryError, match="identity frame of consistent attention"):
        story.reroll(out, 2, seed=5)


def test_partial_run_of_an_identity_frame_remakes_its_readers(shared, tmp_path):
    spec, first = shared
    out = tmp_path / "story"
    story.generate_story(spec, out, model="tiny")
    edited = write_spec(spec.parent / "edited.yaml", ON, seeds={2: 4242})
    result = story.generate_story(edited, out, model="tiny", frames=[2])
    assert result.generated == [1, 2, 3, 4, 5, 6]
    assert all(result.frame_hashes[i] != first.frame_hashes[i] for i in range(1, 7))


def test_each_cfg_half_attends_within_itself():
    """The key/value input of a frame is its own tokens, then the lent tokens of the same CFG half."""
    from diffsynth.models.attention import Attention

    settings = SharingSettings(0.5, ("up",), 0, None, (1, 2), (3,))
    bank = AttentionBank(settings)
    attention = Attention(q_dim=8, num_heads=2, head_dim=4)
    seen = []
    attention.register_forward_hook(lambda m, a, k, out: seen.append(k["encoder_hidden_states"]), with_kwargs=True)

    class Unet(torch.nn.Module):  # just enough of SDXLUNet's block list to name one up-block layer
        def __init__(self):
            from diffsynth.models.sd_unet import AttentionBlock, PopBlock, ResnetBlock
            super().__init__()
            block = AttentionBlock(2, 4, 8, 1, 8, norm_num_groups=2)
            block.transformer_blocks[0].attn1 = attention
            mid = AttentionBlock(2, 4, 8, 1, 8, norm_num_groups=2)
            self.blocks = torch.nn.ModuleList([ResnetBlock(8, 8, 8, groups=2), mid, PopBlock(), block])

    unet = Unet()
    assert [name for name, _ in attention_layers(unet)] == ["mid.0.0.0", "up.0.0.0"]
    identity = torch.randn(4, 6, 8)  # frames 1, 2 positive, then 1, 2 negative; 6 tokens each
    hooks = shared_attention(unet, bank, [(1, 11), (2, 12)])
    hooks.at_step(0)
    attention(identity, encoder_hidden_states=None)
    hooks.remove()
    kv = seen.pop()
    lent2 = lent_tokens(6, 0.5, 12, 0, "up.0.0.0")
    assert kv.shape == (4, 9, 8)
    assert torch.equal(kv[0], torch.cat([identity[0], identity[1, lent2]]))  # frame 1, positive
    assert torch.equal(kv[2], torch.cat([identity[2], identity[3, lent2]]))  # frame 1, negative
    reader = torch.randn(2, 6, 8)
    hooks = shared_attention(unet, bank, [(3, 13)])
    hooks.at_step(0)
    attention(reader, encoder_hidden_states=None)
    hooks.remove()
    kv = seen.pop()
    lent1 = lent_tokens(6, 0.5, 11, 0, "up.0.0.0")
    assert torch.equal(kv[1], torch.cat([reader[1], identity[2, lent1], identity[3, lent2]]))
    assert not attention._forward_pre_hooks  # every hook removed after its batch


@pytest.mark.parametrize(("sharing", "message"), [
    ({"share": 1.5}, r"line \d+: generation\.consistent_attention\.share"),
    ({"layers": ["up", "upper"]}, r"line \d+: generation\.consistent_attention\.layers\.1"),
    ({"identity_frames": [1, 9]}, r"line \d+: generation\.consistent_attention\.identity_frames: no frame 9"),
    ({"start_step": 2}, r"start_step: 2 is not below"),
])
def test_spec_errors_name_the_line(tmp_path, sharing, message):
    spec = write_spec(tmp_path / "story.yaml", sharing)
    with pytest.raises(KstoryError, match=message):
        story.load_spec(spec)
