"""Coherence across frames and fit to prompts, from embeddings computed once per image.

CLIP-T is the cosine between a frame and its prompt; CLIP-I the cosine between
two frames. Each frame's mean similarity to all the others names the odd one
out, which is the frame to regenerate when a story looks inconsistent. Raw
cosines are reported (not CLIPScore's ``100 * max(cos, 0)``), so nothing is
clipped away.
"""

from __future__ import annotations

import torch

from kstory.scoring.identity import pairwise_clip_i, row_means_to_others


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def clip_t(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> list[float]:
    """Cosine between each image and the text at the same row."""
    return (_unit(image_embeds.float()) * _unit(text_embeds.float())).sum(dim=-1).tolist()


def mean_to_others(similarity: torch.Tensor) -> list[float] | None:
    """Each row's mean over the other columns of a square matrix; None for fewer than two frames."""
    n = similarity.shape[0]
    if n < 2:
        return None
    off_diagonal = similarity.sum(dim=1) - similarity.diagonal()
    return (off_diagonal / (n - 1)).tolist()


def clip_i_to_others(image_embeds: torch.Tensor) -> list[float] | None:
    """Each frame's mean cosine to every other frame."""
    return row_means_to_others(pairwise_clip_i(image_embeds))
