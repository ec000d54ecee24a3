"""The best-of-N objective: which candidate of each frame makes the best story.

A story must first clear the gate: its mean aesthetic score at least
``threshold + margin``, and every frame's CLIP-T (fit to its prompt) at least
``clip_t_floor``. Among the sets that clear it, the one whose frames look most
alike (identity: mean pairwise cosine of their image embeddings) wins, then
the higher mean aesthetic. A set that cannot clear it is ranked by how many
frames meet the floor, then by its mean aesthetic, so the search always ends
with the set closest to the gate.

Pure Python and NumPy on scores computed elsewhere (the story stage does not
import the scorer); every choice is deterministic, ties broken by candidate order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """One rendered candidate of one frame with its scores (``embedding``: unit length, or None)."""

    frame: int
    seed: int
    aesthetic: float
    clip_t: float | None = None
    embedding: np.ndarray | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Goal:
    """What the story must reach: the gate plus a margin, and a CLIP-T floor per frame (None: no floor)."""

    threshold: float = 6.0
    margin: float = 0.1
    clip_t_floor: float | None = None

    @property
    def target(self) -> float:
        return self.threshold + self.margin

    def fits_prompt(self, candidate: Candidate) -> bool:
        return self.clip_t_floor is None or candidate.clip_t is None or candidate.clip_t >= self.clip_t_floor


@dataclass(frozen=True)
class Selection:
    """One candidate per frame and how the set stands against the goal."""

    picks: dict[int, Candidate]
    mean: float
    identity: float | None
    met: bool
    below_floor: list[int]  # frames whose pick misses the CLIP-T floor
    holding_back: list[int]  # frames to improve first, weakest first (empty when the goal is met)
    goal: Goal

    @property
    def above_gate(self) -> float:
        """Mean minus the threshold: negative while the story fails the gate."""
        return self.mean - self.goal.threshold

    @property
    def short_of_target(self) -> float:
        """How far the mean is below threshold + margin (0 when it reaches it)."""
        return max(0.0, self.goal.target - self.mean)

    def describe(self) -> str:
        state = "met" if self.met else "NOT met"
        text = (f"goal {state}: mean aesthetic {self.mean:.4f}, {self.above_gate:+.4f} from the gate "
                f"{self.goal.threshold:g} (target {self.goal.target:g} with margin {self.goal.margin:g})")
        if self.identity is not None:
            text += f", identity {self.identity:.4f}"
        if self.below_floor:
            text += f"; below the CLIP-T floor {self.goal.clip_t_floor:g}: frame(s) {', '.join(map(str, self.below_floor))}"
        if self.holding_back:
            text += "; held back by frame(s) " + ", ".join(
                f"{i} ({self.picks[i].aesthetic:.3f})" for i in self.holding_back)
        return text


def identity(picks: Mapping[int, Candidate]) -> float | None:
    """Mean cosine over every pair of picked frames (CLIP-I of the set); None without embeddings."""
    embeds = [c.embedding for c in picks.values()]
    if len(embeds) < 2 or any(e is None for e in embeds):
        return None
    unit = np.stack([np.asarray(e, dtype=np.float64) for e in embeds])
    unit = unit / np.linalg.norm(unit, axis=1, keepdims=True)
    sims = unit @ unit.T
    n = len(embeds)
    return float((sims.sum() - np.trace(sims)) / (n * (n - 1)))


def to_others(candidate: Candidate, picks: Mapping[int, Candidate]) -> float | None:
    """A candidate's mean cosine to the other frames' picks (its identity with the rest of the story)."""
    others = [c.embedding for f, c in picks.items() if f != candidate.frame]
    if candidate.embedding is None or not others or any(e is None for e in others):
        return None
    own = np.asarray(candidate.embedding, dtype=np.float64)
    own = own / np.linalg.norm(own)
    rest = np.stack([np.asarray(e, dtype=np.float64) for e in others])
    rest = rest / np.linalg.norm(rest, axis=1, keepdims=True)
    return float((rest @ own).mean())


def rank_key(picks: Mapping[int, Candidate], goal: Goal) -> tuple[float, ...]:
    """Larger is better: sets that meet the goal first (by identity, then mean), then by frames on the floor and mean."""
    mean = float(np.mean([c.aesthetic for c in picks.values()]))
    on_floor = sum(goal.fits_prompt(c) for c in picks.values())
    ident = identity(picks)
    met = on_floor == len(picks) and mean >= goal.target
    if met:
        return (1.0, float(on_floor), ident if ident is not None else 0.0, mean)
    return (0.0, float(on_floor), mean, ident if ident is not None else 0.0)


def evaluate(picks: Mapping[int, Candidate], goal: Goal) -> Selection:
    picks = dict(sorted(picks.items()))
    mean = float(np.mean([c.aesthetic for c in picks.values()]))
    below = [f for f, c in picks.items() if not goal.fits_prompt(c)]
    met = not below and mean >= goal.target
    holding = [] if met else below + sorted(
        (f for f, c in picks.items() if f not in below and c.aesthetic < goal.target), key=lambda f: picks[f].aesthetic)
    return Selection(picks, mean, identity(picks), met, below, holding, goal)


def _best_by_aesthetic(options: Sequence[Candidate], goal: Goal) -> Candidate:
    """The frame's highest aesthetic among candidates on the CLIP-T floor (all of them when none is)."""
    eligible = [c for c in options if goal.fits_prompt(c)] or list(options)
    return max(enumerate(eligible), key=lambda item: (item[1].aesthetic, -item[0]))[1]


def _ascend(start: dict[int, Candidate], candidates: Mapping[int, Sequence[Candidate]], goal: Goal,
            passes: int = 4) -> dict[int, Candidate]:
    """Coordinate ascent on ``rank_key``: change one frame at a time while the set gets better."""
    picks, best = dict(start), rank_key(start, goal)
    for _ in range(passes):
        improved = False
        for frame in sorted(candidates):
            for option in candidates[frame]:
                if option is picks[frame]:
                    continue
                trial = {**picks, frame: option}
                key = rank_key(trial, goal)
                if key > best:
                    picks, best, improved = trial, key, True
        if not improved:
            break
    return picks


def _anchored(anchor: Candidate, candidates: Mapping[int, Sequence[Candidate]], goal: Goal) -> dict[int, Candidate]:
    """A start built around ``anchor``: every other frame takes its candidate most like it (on the floor)."""
    own = np.asarray(anchor.embedding, dtype=np.float64)
    picks = {}
    for frame, options in candidates.items():
        if frame == anchor.frame:
            picks[frame] = anchor
            continue
        eligible = [c for c in options if goal.fits_prompt(c) and c.embedding is not None] or list(options)
        picks[frame] = max(enumerate(eligible), key=lambda item: (
            _cosine(own, item[1].embedding), item[1].aesthetic, -item[0]))[1]
    return picks


def _cosine(a: np.ndarray, b: np.ndarray | None) -> float:
    if b is None:
        return -2.0
    b = np.asarray(b, dtype=np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def select(candidates: Mapping[int, Sequence[Candidate]], goal: Goal,
           start: Mapping[int, Candidate] | None = None) -> Selection:
    """The best set found among ``candidates`` (frame -> its candidates, in a fixed order).

    Starts from the highest-aesthetic set (the one closest to the gate) and, when given, from ``start``
    (the best set of an earlier round), improves both by coordinate ascent and keeps the better, so a
    search that adds candidates round by round never ends with a worse set than an earlier round.
    """
    if not candidates or any(not options for options in candidates.values()):
        raise ValueError("every frame needs at least one candidate")
    starts = [{f: _best_by_aesthetic(options, goal) for f, options in candidates.items()}]
    if start is not None and set(start) == set(candidates):
        starts.append(dict(start))
    if rank_key(starts[0], goal)[0] == 1.0:  # the goal can be met: look for the most alike sets too
        starts += [_anchored(anchor, candidates, goal) for options in candidates.values() for anchor in options
                   if anchor.embedding is not None]
    results = [_ascend(s, candidates, goal) for s in starts]
    best = max(enumerate(results), key=lambda item: (rank_key(item[1], goal), -item[0]))[1]
    return evaluate(best, goal)
