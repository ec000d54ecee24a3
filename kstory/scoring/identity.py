"""Identity scores of a story, reported as the consistency literature does (StoryDiffusion, ConsiStory, 1Prompt1Story).

* CLIP-I: the mean pairwise cosine of the frames' CLIP image embeddings;
* DreamSim: the mean pairwise DreamSim distance, when DreamSim is installed and asked for;
* CLIP-T: the mean cosine between each frame and its prompt;
* the odd one out: the frame with the lowest mean CLIP-I to the others, the one to regenerate.

``pairwise_clip_i`` is the reusable piece: any caller with image embeddings (a
best-of-N search comparing candidates to the story, say) gets the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from kstory.scoring.report import IdentityScores


def pairwise_clip_i(image_embeds: torch.Tensor) -> torch.Tensor:
    """The ``[n, n]`` cosine matrix of image embeddings (float32; 1 on the diagonal)."""
    unit = torch.nn.functional.normalize(image_embeds.float(), dim=-1)
    return unit @ unit.T


def mean_off_diagonal(matrix: torch.Tensor) -> float | None:
    """The mean over all pairs (i != j) of a square matrix; None for fewer than two frames."""
    n = matrix.shape[0]
    if n < 2:
        return None
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * (n - 1)))


def row_means_to_others(matrix: torch.Tensor) -> list[float] | None:
    """Each frame's mean over the other frames; None for fewer than two frames."""
    n = matrix.shape[0]
    if n < 2:
        return None
    return ((matrix.sum(dim=1) - matrix.diagonal()) / (n - 1)).tolist()


def identity_scores(files: Sequence[str], image_embeds: torch.Tensor, clip_t: Sequence[float | None] | None = None,
                    dreamsim_embeds: torch.Tensor | None = None) -> IdentityScores:
    """The identity block of a story from embeddings computed once per frame (``files`` name the rows)."""
    similarity = pairwise_clip_i(image_embeds)
    to_others = row_means_to_others(similarity)
    odd = None
    if to_others is not None and len(files) >= 3:
        odd = min(range(len(files)), key=lambda i: to_others[i])
    dreamsim = None
    if dreamsim_embeds is not None:
        unit = torch.nn.functional.normalize(dreamsim_embeds.float(), dim=-1)
        dreamsim = mean_off_diagonal(1 - unit @ unit.T)
    fits = [value for value in (clip_t or []) if value is not None]
    return IdentityScores(
        frames=len(files), clip_i=mean_off_diagonal(similarity), dreamsim=dreamsim,
        clip_t=sum(fits) / len(fits) if fits else None,
        odd_one_out=files[odd] if odd is not None else None,
        odd_one_out_clip_i=to_others[odd] if odd is not None else None,
        clip_i_to_others=dict(zip(files, to_others)) if to_others is not None else {},
    )


def story_identity(frames: Sequence[Path], prompts: Sequence[str | None], *, clip_model: str = "tiny",
                   device: str | None = None, cache_dir: Path | None = None) -> IdentityScores:
    """Load the CLIP model once and score the frames' identity (DreamSim is for ``kstory score --dreamsim``)."""
    from PIL import Image

    from kstory.core.models import default_cache_dir
    from kstory.scoring.clip import load_open_clip
    from kstory.scoring.coherence import clip_t as cosine_to_text

    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clip = load_open_clip(clip_model, device=dev, cache_dir=Path(cache_dir) if cache_dir else default_cache_dir())
    pixels = []
    for frame in frames:
        with Image.open(frame) as image:
            pixels.append(clip.preprocess(image.convert("RGB")))
    image_embeds = clip.encode_images(torch.stack(pixels).to(dev)).float().cpu()
    fit: list[float | None] = [None] * len(frames)
    with_prompt = [i for i, text in enumerate(prompts) if text]
    if with_prompt:
        text_embeds = clip.encode_texts([str(prompts[i]) for i in with_prompt], dev).float().cpu()
        for i, value in zip(with_prompt, cosine_to_text(image_embeds[with_prompt], text_embeds)):
            fit[i] = value
    return identity_scores([str(frame) for frame in frames], image_embeds, fit)


def local_clip(tiny_story: bool) -> str | None:
    """A CLIP model that can score identity without a download: the tiny one for a tiny story, else
    OpenAI's ViT-L/14 when it is already in the Hugging Face cache; None when there is none."""
    if tiny_story:
        return "tiny"
    try:
        import open_clip
        from huggingface_hub import try_to_load_from_cache

        repo = str(open_clip.get_pretrained_cfg("ViT-L-14", "openai").get("hf_hub", "")).strip("/")
        for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            if repo and isinstance(try_to_load_from_cache(repo, name), str):
                return "ViT-L-14:openai"
    except Exception:  # noqa: BLE001 - no cache, no open_clip config: simply no identity line
        return None
    return None


def identity_line(scores: IdentityScores) -> str:
    """One line for the terminal."""
    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    line = f"identity: CLIP-I {num(scores.clip_i)} (mean over frame pairs), CLIP-T {num(scores.clip_t)}"
    if scores.dreamsim is not None:
        line += f", DreamSim {num(scores.dreamsim)}"
    if scores.odd_one_out is not None:
        line += f"; odd one out: {Path(scores.odd_one_out).name} (CLIP-I {num(scores.odd_one_out_clip_i)} to the others)"
    return line
