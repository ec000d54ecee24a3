"""Parity: kstory's batched scorer against the organisers' loop and against open_clip, on random weights.

The organisers' loop below is their published method, run through the
reference packages themselves: ``AestheticsPredictorV2Linear.from_pretrained``
+ ``CLIPProcessor``, one image at a time, ``logits[0][0]``, plain mean.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from aesthetics_predictor import AestheticsPredictorV2Linear
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPProcessor

from kstory.core.atomic import write_json
from kstory.scoring import score_images
from kstory.scoring.tiny import TINY_OPEN_CLIP, build_tiny_aesthetic_model, write_open_clip_model

TOLERANCE = 1e-4


def organisers_scores(model_dir: Path, folder: Path) -> dict[str, float]:
    """The challenge's scoring loop, image by image (it crashes on non-image files, so feed it images only)."""
    predictor = AestheticsPredictorV2Linear.from_pretrained(model_dir).eval()
    processor = CLIPProcessor.from_pretrained(model_dir)
    scores = {}
    for name in os.listdir(folder):
        if os.path.isfile(os.path.join(folder, name)):
            image = Image.open(os.path.join(folder, name))
            inputs = processor(images=image, return_tensors="pt")
            with torch.no_grad():
                scores[name] = predictor(**inputs).logits.tolist()[0][0]
    return scores


def _by_name(report) -> dict[str, float]:
    return {Path(image.file).name: image.aesthetic for image in report.images}


@pytest.fixture(scope="module")
def predictor_dir(tmp_path_factory) -> Path:
    return build_tiny_aesthetic_model(tmp_path_factory.mktemp("predictor") / "tiny", seed=3)


@pytest.fixture(scope="module")
def frames(tmp_path_factory) -> Path:
    """Odd sizes (crop rounding), grayscale, palette, RGBA, a JPEG: every conversion the processor does."""
    folder = tmp_path_factory.mktemp("frames")
    rng = np.random.default_rng(7)

    def noise(h, w):
        base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        return Image.fromarray(base).resize((w, h), Image.BILINEAR)

    noise(301, 517).save(folder / "wide.png")
    noise(640, 333).save(folder / "tall.png")
    noise(224, 224).save(folder / "exact.jpg", quality=90)
    noise(97, 131).convert("L").save(folder / "gray.png")
    noise(256, 300).convert("P", palette=Image.ADAPTIVE).save(folder / "palette.png")
    rgba = noise(260, 260).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (260, 260), dtype=np.uint8)))
    rgba.save(folder / "rgba.png")
    noise(1024, 1024).save(folder / "big.png")
    return folder


def test_matches_the_organisers_loop_in_batches(predictor_dir: Path, frames: Path):
    expected = organisers_scores(predictor_dir, frames)
    report = score_images([frames], aesthetic_model=predictor_dir, clip_model=None, batch_size=3)
    ours = _by_name(report)
    assert ours.keys() == expected.keys()
    for name, value in expected.items():
        assert abs(ours[name] - value) <= TOLERANCE, name
    assert abs(report.mean - sum(expected.values()) / len(expected)) <= TOLERANCE
    assert max(abs(a - b) for a, b in zip(expected.values(), list(expected.values())[1:])) > 10 * TOLERANCE


def test_a_full_width_predictor_of_another_size_loads(tmp_path: Path, frames: Path):
    """Any CLIP width in the same format: here 3 layers, 48 wide, 24-d projection."""
    from kstory.scoring.tiny import write_aesthetic_model

    folder = write_aesthetic_model(tmp_path / "other", dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3,
        image_size=224, patch_size=28, projection_dim=24, hidden_act="quick_gelu"), seed=1, head_bias=5.0)
    expected = organisers_scores(folder, frames)
    ours = _by_name(score_images([frames], aesthetic_model=folder, clip_model=None, batch_size=8))
    assert all(abs(ours[name] - value) <= TOLERANCE for name, value in expected.items())


# --- LAION's form: open_clip tower + MLP file --------------------------------------------------------


def _hf_to_open_clip_visual(hf: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """The same vision tower in open_clip's key layout (test-only converter)."""
    v = "vision_model."
    out = {
        "visual.class_embedding": hf[v + "embeddings.class_embedding"],
        "visual.positional_embedding": hf[v + "embeddings.position_embedding.weight"],
        "visual.conv1.weight": hf[v + "embeddings.patch_embedding.weight"],
        "visual.proj": hf["visual_projection.weight"].T.contiguous(),
    }
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for p in ("weight", "bias"):
            out[f"visual.{ours}.{p}"] = hf[f"{v}{theirs}.{p}"]
    for i in range(layers):
        src, dst = f"{v}encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.in_proj_{p}"] = torch.cat([hf[src + f"self_attn.{x}_proj.{p}"] for x in "qkv"])
            for ours, theirs in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[dst + f"{ours}.{p}"] = hf[src + f"{theirs}.{p}"]
    return out


@pytest.fixture(scope="module")
def laion_form(predictor_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny predictor's weights as an open_clip folder (config without quick_gelu, like ViT-L-14.json) + MLP .pth."""
    root = tmp_path_factory.mktemp("laion")
    hf = load_file(predictor_dir / "model.safetensors")
    config = {**TINY_OPEN_CLIP, "quick_gelu": False}
    tower = write_open_clip_model(root / "vit", config, seed=0)
    state = load_file(tower / "open_clip_model.safetensors")
    state.update(_hf_to_open_clip_visual(hf, layers=config["vision_cfg"]["layers"]))
    save_file(state, tower / "open_clip_model.safetensors")
    write_json(tower / "open_clip_config.json", {"model_cfg": config, "preprocess_cfg": {}})
    head = {k: v.clone() for k, v in hf.items() if k.startswith("layers.")}  # keys as in sac+logos+ava1-l14-linearMSE.pth
    torch.save(head, root / "sac+logos+ava1-l14-linearMSE.pth")
    return tower, root / "sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture(scope="module")
def square_frames(tmp_path_factory) -> Path:
    """Square RGB frames: both preprocessors resize them to the same pixels (no crop rounding)."""
    folder = tmp_path_factory.mktemp("square")
    rng = np.random.default_rng(11)
    for i, side in enumerate((224, 256, 448, 300)):
        base = rng.integers(0, 256, (side // 16, side // 16, 3), dtype=np.uint8)
        Image.fromarray(base).resize((side, side), Image.BILINEAR).save(folder / f"frame_{i}.png")
    return folder


def _laion_reference(tower: Path, head_file: Path, folder: Path, quick_gelu: bool) -> dict[str, float]:
    """LAION's method with open_clip directly: encode, L2-normalise, MLP; one image at a time."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tower}", force_quick_gelu=quick_gelu)
    model.eval()
    mlp = torch.load(head_file, weights_only=True)  # LAION's MLP: Linear layers at 0, 2, 4, 6, 7, Dropout between

    def head(x: torch.Tensor) -> torch.Tensor:
        for i in (0, 2, 4, 6, 7):
            x = x @ mlp[f"layers.{i}.weight"].T + mlp[f"layers.{i}.bias"]
        return x

    scores = {}
    for path in sorted(folder.iterdir()):
        with torch.no_grad():
            embed = model.encode_image(preprocess(Image.open(path)).unsqueeze(0))
            scores[path.name] = head(embed / embed.norm(dim=-1, keepdim=True))[0, 0].item()
    return scores


def test_laion_form_matches_open_clip_and_the_challenge_form(predictor_dir, laion_form, square_frames):
    tower, head_file = laion_form
    report = score_images([square_frames], aesthetic_model=head_file, aesthetic_clip=tower, clip_model=None, batch_size=3)
    assert report.summary.models["aesthetic"].quick_gelu is True
    ours = _by_name(report)
    with_quick_gelu = _laion_reference(tower, head_file, square_frames, quick_gelu=True)
    challenge = organisers_scores(predictor_dir, square_frames)
    for name in challenge:
        assert abs(ours[name] - with_quick_gelu[name]) <= TOLERANCE, name
        assert abs(ours[name] - challenge[name]) <= TOLERANCE, name


def test_plain_gelu_drifts_which_is_why_quick_gelu_is_forced(laion_form, square_frames, predictor_dir):
    tower, head_file = laion_form
    plain = _laion_reference(tower, head_file, square_frames, quick_gelu=False)
    challenge = organisers_scores(predictor_dir, square_frames)
    assert max(abs(plain[n] - challenge[n]) for n in challenge) > 10 * TOLERANCE


# --- coherence and prompt fit against open_clip used directly ------------------------------------------


def test_clip_t_and_clip_i_match_open_clip(square_frames: Path, tmp_path: Path):
    from kstory.scoring.tiny import build_tiny_clip_model

    clip_dir = build_tiny_clip_model(tmp_path / "clip", seed=5)
    prompts = {"frame_0.png": "a watercolour fox", "frame_2.png": "a city at night, ink"}
    report = score_images([square_frames], clip_model=clip_dir, prompts=prompts, batch_size=3)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{clip_dir}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{clip_dir}")
    model.eval()
    names = sorted(p.name for p in square_frames.iterdir())
    with torch.no_grad():
        images = torch.cat([model.encode_image(preprocess(Image.open(square_frames / n)).unsqueeze(0)) for n in names])
        images = images / images.norm(dim=-1, keepdim=True)
        similarity = images @ images.T
        for i, entry in enumerate(report.images):
            others = [similarity[i, j].item() for j in range(len(names)) if j != i]
            assert abs(entry.clip_i_to_others - sum(others) / len(others)) <= TOLERANCE
            if entry.prompt:
                text = model.encode_text(tokenizer([entry.prompt]))
                expected = (images[i] @ (text / text.norm(dim=-1, keepdim=True))[0]).item()
                assert abs(entry.clip_t - expected) <= TOLERANCE
            else:
                assert entry.clip_t is None
    odd = min(range(len(names)), key=lambda i: report.images[i].clip_i_to_others)
    assert report.summary.odd_one_out == report.images[odd].file
