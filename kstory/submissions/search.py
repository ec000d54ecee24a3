"""``kstory search RUN``: best-of-N seeds per frame, scored, and the set that clears the gate best.

It builds on two stages, like verify: candidates render through the story's
batched ``Session`` (kstory.story.candidates) and are scored by a scorer
loaded before anything renders (kstory.scoring.in_memory, or any object with
the same ``score`` method). The choice is kstory.story.objective's, round by
round, stopping as soon as the goal is met. Locked frames (story/review.json)
are never searched, nor are the identity frames of consistent attention and a
character reference's frame (the frames that depend on them would change).
Every candidate is on disk and listed as soon as its batch
finishes, so Ctrl-C loses nothing and the next run continues.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.seeds import candidate_seeds
from kstory.story import review
from kstory.story.apply_picks import apply_picks
from kstory.story.candidates import (FULL, PREVIEW, CandidateStore, FrameTies, Quality, Rendered, candidates_dir,
                                     render_round, story_batches, timer)
from kstory.story.generate import Session
from kstory.story.manifest import read_manifest
from kstory.story.objective import Candidate, Goal, Selection, select, to_others
from kstory.story.recorded_setup import recorded_session
from kstory.story.reference_records import find_recorded_adapter
from kstory.story.reroll_frame import plan_from_record
from kstory.story.run import spec_values
from kstory.story.spec import load_spec
from kstory.story.spec_copy import SPEC_COPY

log = get_logger("search")
GOAL_MISSED_EXIT = 3  # the gate's failing status (kstory.scoring.GATE_FAILED_EXIT)


class Scored(Protocol):
    aesthetic: float
    clip_t: float | None
    embedding: Any


class Scorer(Protocol):
    """Scores pictures in memory, in batches; ``identity`` names the models for the records."""

    identity: Mapping[str, Any]

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> Sequence[Scored]: ...


@dataclass(frozen=True)
class SearchSettings:
    """``candidates`` None: the spec's ``generation.candidates``. ``preview_steps``/``preview_scale`` turn on the
    preview pass; then only the ``keep`` best previews of each frame are rendered at full quality."""

    candidates: int | None = None
    threshold: float = 6.0
    margin: float = 0.1
    clip_t_floor: float | None = None
    preview_steps: int | None = None
    preview_scale: float = 1.0
    keep: int = 2

    @property
    def preview(self) -> Quality | None:
        if self.preview_steps is None and self.preview_scale == 1.0:
            return None
        return Quality(PREVIEW, self.preview_steps, self.preview_scale)


@dataclass
class SearchResult:
    story_dir: Path
    selection: Selection
    candidates: int
    rendered: int  # pictures rendered by this call (full and preview)
    reused: int  # finished candidates found on disk from an earlier (interrupted) call
    seconds: float
    seconds_to_goal: float | None  # None: the goal was not met
    changed: bool  # the story folder was updated with new picks or records
    rank_correlation: float | None  # Spearman of preview vs full aesthetic over candidates rendered both ways
    notes: list[str] = field(default_factory=list)

    @property
    def exit_status(self) -> int:
        return 0 if self.selection.met and self.candidates >= 1 else GOAL_MISSED_EXIT

    def render(self) -> str:
        lines = [f"search of {self.story_dir}: {self.candidates} candidate(s) per frame, {self.rendered} rendered, "
                 f"{self.reused} reused, {self.seconds:.1f} s"]
        for frame, pick in sorted(self.selection.picks.items()):
            fit = "" if pick.clip_t is None else f"  CLIP-T {pick.clip_t:.3f}"
            lines.append(f"  frame {frame}: seed {pick.seed}  aesthetic {pick.aesthetic:.4f}{fit}")
        lines.append(self.selection.describe())
        if self.rank_correlation is not None:
            lines.append(f"preview/full rank correlation (Spearman): {self.rank_correlation:.3f}")
        lines += self.notes
        return "\n".join(lines)


def story_dir_of(path: Path) -> Path:
    """A run folder's ``story/``, or the story folder itself."""
    path = Path(path)
    for folder in (path / "story", path):
        if (folder / "manifest.json").is_file():
            return folder
    raise KstoryError("no story here (no manifest.json)", path=path, fix="pass a run folder (runs/NAME) or its story "
                      "folder; run `kstory story` first")


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties ranked by order); None below 3 pairs or with a constant side."""
    if len(a) < 3:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


class _Pool:
    """Every scored candidate of the search, by frame, with its rendering."""

    def __init__(self, scorer: Scorer, prompts: Mapping[int, str], store: CandidateStore):
        self.scorer, self.prompts, self.store = scorer, prompts, store
        self.full: dict[int, list[Candidate]] = {}
        self.files: dict[tuple[int, int], Rendered] = {}
        self.preview: dict[tuple[int, int], Candidate] = {}
        self.rendered = self.reused = 0

    def add(self, items: Sequence[Rendered], *, in_story: bool = False) -> None:
        images = [item.image if item.image is not None else _open(item.file) for item in items]
        scores = self.scorer.score(images, [self.prompts[item.frame] for item in items])
        for item, score in zip(items, scores):
            candidate = Candidate(item.frame, item.seed, float(score.aesthetic),
                                  None if score.clip_t is None else float(score.clip_t), score.embedding)
            if not in_story:
                self.rendered += item.image is not None
                self.reused += item.image is None
                self.store.record_scores(item.key, {"aesthetic": candidate.aesthetic, "clip_t": candidate.clip_t})
            if item.quality == PREVIEW:
                self.preview[(item.frame, item.seed)] = candidate
            elif (item.frame, item.seed) not in self.files:
                self.full.setdefault(item.frame, []).append(candidate)
                self.files[(item.frame, item.seed)] = item

    def has_full(self, frame: int, seed: int) -> bool:
        return (frame, seed) in self.files


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def search_story(
    story: Path, settings: SearchSettings, *, scorer: Scorer, controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None, progress: Callable[[dict[str, Any]], None] | None = None,
) -> SearchResult:
    """Search the story in ``story`` (a run or story folder); see the module docstring and docs/story.md."""
    clock = timer()
    story_dir = story_dir_of(story)
    manifest = read_manifest(story_dir)
    assert manifest is not None
    records = manifest["frames"]
    spec = load_spec(story_dir / SPEC_COPY)
    n = settings.candidates if settings.candidates is not None else spec.generation.candidates
    goal = Goal(settings.threshold, settings.margin, settings.clip_t_floor)
    locked = {int(k) for k in review.load(story_dir).locked if k in records}
    frames = sorted(int(k) for k in records)
    plans = {i: plan_from_record(story_dir, i, records[str(i)]) for i in frames}
    ties = FrameTies.of(plans, manifest)
    store = CandidateStore(candidates_dir(story_dir), manifest["setup_id"])
    pool = _Pool(scorer, {i: plans[i].prompt for i in frames}, store)
    pool.add([Rendered(i, int(records[str(i)]["seed"]), FULL, records[str(i)]["key"], story_dir / records[str(i)]["file"],
                       records[str(i)]["sha256"], float(records[str(i)].get("seconds", 0.0))) for i in frames],
             in_story=True)
    best = select(pool.full, goal)
    notes: list[str] = []
    if locked:
        notes.append(f"locked frame(s) {', '.join(map(str, sorted(locked)))} kept as they are (story/review.json)")
    identity = [i for i in ties.identity_frames() if i not in locked]
    if identity:
        notes.append(f"identity frame(s) {', '.join(map(str, identity))} of consistent attention kept as they are: "
                     "every frame reading their bank would change (change their seeds in the spec and run "
                     "`kstory story`)")
    sources = sorted({p.reference.frame for p in plans.values() if p.reference and p.reference.frame} - locked)
    if sources:
        notes.append(f"reference frame(s) {', '.join(map(str, sources))} of the character reference kept as they "
                     "are: every frame using their picture would change (change their seeds in the spec and run "
                     "`kstory story`)")
    searched = [i for i in frames if i not in locked and i not in identity and i not in sources]
    met_at = clock() if best.met else None
    if n < 1:
        notes.append(f"candidates is {n}, below 1: nothing was searched; the current story is the best set")
    elif best.met:
        notes.append("the story already meets the goal: nothing rendered")
    elif searched:
        seeds = {i: candidate_seeds(spec_values(records[str(i)])[0], n) for i in searched}
        loader = _session_loader(story_dir, manifest, plans, controlnets, cache_dir,
                                 spec.generation.release_text_encoder)
        batches = story_batches(plans, records)

        def run(round_seeds: dict[int, int], quality: Quality, phase: str, number: int) -> None:
            for items in render_round(store, plans, batches, round_seeds, quality, loader,
                                      spec.generation.release_text_encoder, ties):
                pool.add(items)
                store.save()
                log.info("%s round %d: frames %s done", phase, number, ", ".join(str(i.frame) for i in items))
                if progress is not None:
                    progress({"phase": phase, "round": number, "frames": [i.frame for i in items],
                              "rendered": pool.rendered, "reused": pool.reused})

        order = {i: list(seeds[i]) for i in searched}
        preview = settings.preview
        if preview is not None:
            for r in range(n):
                run({i: seeds[i][r] for i in searched}, preview, "preview", r)
            order = {i: _by_preview(seeds[i], i, pool, goal)[: max(settings.keep, 0)] for i in searched}
        for r in range(max(len(o) for o in order.values())):
            wanted = {i: o[r] for i, o in order.items() if r < len(o) and not pool.has_full(i, o[r])}
            if wanted:
                run(wanted, Quality(), "full", r)
            best = select(pool.full, goal, start=best.picks)
            if best.met:
                met_at = clock()
                if r + 1 < max(len(o) for o in order.values()):
                    notes.append(f"goal met after round {r + 1}: stopped early")
                break
    if not best.met:
        notes.append("no set of candidates meets the goal: the best set found is kept (exit status 3)")
    pairs = [(pool.preview[k].aesthetic, c.aesthetic) for i in pool.full for c in pool.full[i]
             if (k := (i, c.seed)) in pool.preview]
    correlation = spearman([p for p, _ in pairs], [f for _, f in pairs])
    searched_now = bool(pool.rendered or pool.reused)
    record = {i: _search_record(i, pool, best) for i in searched} if searched_now else {}  # else: keep the last
    picks = {i: pool.files[(i, c.seed)] for i, c in best.picks.items()}
    _keep_replaced(store, story_dir, plans, records, picks, pool, ties)
    changed = apply_picks(story_dir, plans, picks, record)
    store.extra["search"] = _outcome(best, settings, n, scorer, correlation)
    if store.entries or changed:
        store.save()
    return SearchResult(story_dir, best, n, pool.rendered, pool.reused, clock(), met_at, changed, correlation, notes)


def _session_loader(story_dir: Path, manifest: dict[str, Any], plans: Mapping[int, Any],
                    controlnets: Mapping[str, Path] | None, cache_dir: Path | None,
                    release: str) -> Callable[[], Session]:
    """One session for the whole search, loaded on first use, with every prompt encoded once up front."""
    needed = {g.controlnet for plan in plans.values() for g in plan.guides}
    adapter = find_recorded_adapter(manifest.get("ip_adapter"), None, cache_dir)
    load = recorded_session(story_dir, manifest, needed, controlnets=controlnets, cache_dir=cache_dir,
                            ip_adapter=adapter)
    live: list[Session] = []

    def session() -> Session:
        if not live:
            live.append(load())
            live[0].encode(list(plans.values()), release)
            live[0].references.encode(list(plans.values()))  # reference images: the image encoder's phase
            # a frame reference reads the story's own picture of that frame (never searched, so never replaced)
            live[0].references.frame_file = lambda index: story_dir / str(manifest["frames"][str(index)]["file"])
        return live[0]

    return session


def _keep_replaced(store: CandidateStore, story_dir: Path, plans: Mapping[int, Any], records: Mapping[str, Any],
                   picks: Mapping[int, Rendered], pool: _Pool, ties: FrameTies) -> None:
    """Keep each story picture a pick replaces among the candidates, so it can be picked back later."""
    for i, pick in picks.items():
        record = records[str(i)]
        if pick.sha256 == record["sha256"]:
            continue
        scored = next((c for c in pool.full.get(i, []) if c.seed == int(record["seed"])), None)
        scores = {} if scored is None else {"aesthetic": scored.aesthetic, "clip_t": scored.clip_t}
        store.keep(plans[i], record, story_dir, scores, ties)


def _by_preview(seeds: Sequence[int], frame: int, pool: _Pool, goal: Goal) -> list[int]:
    """The frame's seeds, best preview first (on the CLIP-T floor, then aesthetic; ties by candidate order)."""
    ranked = sorted(range(len(seeds)), key=lambda k: (
        not goal.fits_prompt(pool.preview[(frame, seeds[k])]), -pool.preview[(frame, seeds[k])].aesthetic, k))
    return [seeds[k] for k in ranked]


def _search_record(frame: int, pool: _Pool, best: Selection) -> dict[str, Any]:
    """What the manifest keeps per searched frame: every candidate's seed and scores, and the pick."""
    entries = []
    for c in pool.full[frame]:
        entries.append({"seed": c.seed, "quality": FULL, "aesthetic": c.aesthetic, "clip_t": c.clip_t,
                        "identity": to_others(c, best.picks)})
    for (f, seed), c in sorted(pool.preview.items()):
        if f == frame:
            entries.append({"seed": seed, "quality": PREVIEW, "aesthetic": c.aesthetic, "clip_t": c.clip_t,
                            "identity": None})
    return {"pick": best.picks[frame].seed, "candidates": entries}


def _outcome(best: Selection, settings: SearchSettings, n: int, scorer: Scorer,
             correlation: float | None) -> dict[str, Any]:
    return {
        "candidates": n, "threshold": settings.threshold, "margin": settings.margin,
        "clip_t_floor": settings.clip_t_floor, "preview_steps": settings.preview_steps,
        "preview_scale": settings.preview_scale, "keep": settings.keep, "scorer": dict(scorer.identity),
        "met": best.met, "mean": best.mean, "identity": best.identity, "above_gate": best.above_gate,
        "holding_back": best.holding_back, "picks": {str(f): c.seed for f, c in best.picks.items()},
        "pick_scores": {str(f): {"aesthetic": c.aesthetic, "clip_t": c.clip_t} for f, c in best.picks.items()},
        "rank_correlation": correlation,
    }
