"""Identity scores with the tiny open_clip model: identical frames, a replaced odd frame, the report's block."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kstory.scoring import score_images
from kstory.scoring.identity import identity_scores, pairwise_clip_i, story_identity


def _frame(path: Path, seed: int, base: np.ndarray | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = base if base is not None else rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_pairwise_clip_i_is_the_cosine_matrix():
    embeds = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    matrix = pairwise_clip_i(embeds)
    assert torch.allclose(matrix.diagonal(), torch.ones(3))
    assert matrix[0, 1].item() == pytest.approx(0.0) and matrix[0, 2].item() == pytest.approx(2 ** -0.5)
    scores = identity_scores(["a", "b", "c"], embeds, [0.5, None, 0.25])
    assert scores.clip_i == pytest.approx(2 * 2 ** -0.5 / 3) and scores.clip_t == pytest.approx(0.375)
    assert scores.odd_one_out in ("a", "b") and scores.clip_i_to_others["c"] == pytest.approx(2 ** -0.5)


def test_identical_frames_score_one_and_a_replaced_frame_is_the_odd_one_out(tmp_path):
    base = np.asarray(Image.new("RGB", (64, 64), (200, 120, 40)))
    base = base.copy()
    base[16:48, 16:48] = (30, 60, 200)
    same = [_frame(tmp_path / f"{i}.png", i, base) for i in range(4)]
    scores = story_identity(same, ["a fox"] * 4, clip_model="tiny", device="cpu")
    assert scores.clip_i == pytest.approx(1.0, abs=1e-5) and scores.clip_t is not None
    odd = _frame(tmp_path / "odd.png", 7)
    near = [_frame(tmp_path / f"near{i}.png", i, np.clip(base.astype(int) + i, 0, 255).astype(np.uint8))
            for i in range(3)]
    scores = story_identity([near[0], near[1], odd, near[2]], [None] * 4, clip_model="tiny", device="cpu")
    assert Path(scores.odd_one_out) == odd and scores.clip_i < 1.0 and scores.clip_t is None


def test_score_report_carries_the_identity_block(tmp_path):
    base = np.zeros((64, 64, 3), np.uint8)
    base[:, :32] = 255
    files = [_frame(tmp_path / f"f{i}.png", i, np.roll(base, i, axis=1)) for i in range(3)]
    out = tmp_path / "scores.json"
    report = score_images(files, aesthetic_model="tiny", clip_model="tiny", out=out, device="cpu",
                          prompts={f.name: "a fox" for f in files})
    identity = json.loads(out.read_text())["identity"]
    assert identity["frames"] == 3 and identity["clip_i"] == pytest.approx(report.summary.clip_i_mean)
    assert identity["clip_t"] == pytest.approx(report.summary.clip_t_mean)
    assert identity["odd_one_out"] == report.summary.odd_one_out
