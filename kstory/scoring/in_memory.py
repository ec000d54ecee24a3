"""Score pictures already in memory, in batches: the aesthetic predictor, CLIP-T and a CLIP image embedding.

The best-of-N search scores every candidate right after it is decoded, so
going through files (``score_images``) would encode and decode each PNG again.
Same models, same preprocessing (PIL ``convert("RGB")`` then the predictor's
own processor), so a picture scores here exactly as its PNG does in
``kstory score``. The CLIP embedding is returned for identity (CLIP-I).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.models import default_cache_dir
from kstory.scoring.aesthetic import CHALLENGE_ID, AestheticModel, load_aesthetic_model
from kstory.scoring.clip import OpenClip, load_open_clip
from kstory.scoring.score import AUTO, REAL_CLIP

TINY_FLAG = "--aesthetic-model tiny"


@dataclass(frozen=True)
class PictureScore:
    aesthetic: float
    clip_t: float | None
    embedding: np.ndarray | None  # unit-length CLIP image embedding (None without a CLIP model)


@dataclass
class InMemoryScorer:
    """The loaded models; ``score`` takes PIL pictures and their prompts."""

    aesthetic: AestheticModel
    clip: OpenClip | None
    device: torch.device
    batch_size: int = 8
    _texts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def identity(self) -> dict[str, str | None]:
        return {"aesthetic": self.aesthetic.info.identity, "clip": self.clip.info.identity if self.clip else None,
                "random_weights": bool(self.aesthetic.info.random_weights)}

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[PictureScore]:
        out: list[PictureScore] = []
        for start in range(0, len(images), self.batch_size):
            chunk = [image.convert("RGB") for image in images[start : start + self.batch_size]]
            texts = list(prompts[start : start + self.batch_size])
            pixels = torch.stack([self.aesthetic.preprocess(image) for image in chunk]).to(self.device)
            aesthetic = self.aesthetic.score(pixels).tolist()
            if self.clip is None:
                out += [PictureScore(a, None, None) for a in aesthetic]
                continue
            embeds = self.clip.encode_images(torch.stack([self.clip.preprocess(i) for i in chunk]).to(self.device))
            embeds = torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()
            text = torch.stack([self._text(t) for t in texts])
            fit = (embeds * text).sum(dim=-1).tolist()
            out += [PictureScore(a, t, e.numpy()) for a, t, e in zip(aesthetic, fit, embeds)]
        return out

    def _text(self, prompt: str) -> torch.Tensor:
        """Each prompt is encoded once for all its candidates."""
        if prompt not in self._texts:
            assert self.clip is not None
            embed = self.clip.encode_texts([prompt], self.device).float().cpu()[0]
            self._texts[prompt] = embed / embed.norm()
        return self._texts[prompt]


def load_in_memory_scorer(aesthetic_model: str | Path, *, clip_model: str | Path | None = AUTO,
                          device: str | None = None, cache_dir: Path | None = None,
                          batch_size: int = 8) -> InMemoryScorer:
    """Load the predictor and CLIP once; missing weights are a KstoryError naming what to get (or the tiny flag)."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        aesthetic = load_aesthetic_model(aesthetic_model, device=dev, cache_dir=cache)
    except KstoryError as error:
        raise KstoryError(
            f"the search needs the aesthetic predictor before it renders anything: {error.message}",
            path=error.path,
            fix=f"download {CHALLENGE_ID} once while online (`kstory score RUN --aesthetic-model kolors-challenge`), "
                f"pass a local predictor folder with --aesthetic-model, or {TINY_FLAG} for a dry run whose scores "
                "mean nothing") from None
    if clip_model == AUTO:
        clip_model = "tiny" if aesthetic.info.random_weights else REAL_CLIP
    clip = None
    if clip_model is not None:
        try:
            clip = load_open_clip(clip_model, device=dev, cache_dir=cache)
        except KstoryError as error:
            raise KstoryError(
                f"the search needs CLIP for prompt fit and identity before it renders anything: {error.message}",
                fix=f"make {clip_model} available (open_clip downloads it once online), pass a local one with "
                    "--clip-model, or --clip-model none to search on aesthetics alone") from None
    return InMemoryScorer(aesthetic, clip, dev, batch_size)
