"""Candidate frames for the best-of-N search: rendered in the story's own batches and kept as they finish.

A frame's last bits depend on how many frames share its batch (docs/story.md),
so a *round* of candidates runs every batch of the story exactly as the story
did, each frame with one of its candidate seeds. A candidate is then bit for
bit the frame a full story run with that seed makes, and picking it needs no
second render: ``kstory verify`` regenerates the picks from the manifest alone.

With consistent attention a round first runs the identity frames' batches
(never searched: every reading frame depends on them) to fill the attention
bank, then the reading frames' candidate batches, as a story run does.

A preview round runs the same batches with fewer steps and/or smaller frames
(guides resized to match); its pictures only rank the candidates.

Every finished candidate is written at once (PNG, atomically) and listed in
``candidates/index.json`` after each batch, keyed like a story frame (the hash of
everything that decides its pixels), so an interrupted search resumes without
rendering a finished candidate again.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from kstory.core.atomic import write_json
from kstory.core.hashing import sha256_file
from kstory.story.build import plan_key
from kstory.story.consistent_attention import IDENTITY, READER, AttentionBank, SharingSettings, sharing_key
from kstory.story.generate import FramePlan, Session
from kstory.story.manifest import frame_name, png_bytes, save_png, sha256_bytes
from kstory.story.reference_records import keyed
from kstory.story.staging import link_or_copy

FOLDER = "candidates"
INDEX = "index.json"
FORMAT = "kstory-candidates/1"
FULL, PREVIEW = "full", "preview"


def candidates_dir(story_dir: Path) -> Path:
    """Where a story's candidates live: beside the story folder (``runs/<name>/candidates/``)."""
    return Path(story_dir).resolve().parent / FOLDER


@dataclass(frozen=True)
class Quality:
    """How a round renders: ``full`` is the story's own settings; a preview has fewer steps and/or smaller frames."""

    name: str = FULL
    steps: int | None = None  # None: the frame's own
    scale: float = 1.0  # frame side multiplier, rounded to a multiple of 64 (at least 64)

    def plan(self, plan: FramePlan) -> FramePlan:
        """``plan`` at this quality (the full quality is the plan itself)."""
        if self.name == FULL:
            return plan
        width, height = _side(plan.width, self.scale), _side(plan.height, self.scale)
        out = copy.copy(plan)
        out.steps = min(plan.steps, self.steps) if self.steps else plan.steps
        out.width, out.height = width, height
        out.guides = [copy.copy(g) for g in plan.guides]
        for guide in out.guides:
            if guide.image.size != (width, height):
                guide.image = guide.image.resize((width, height), Image.BILINEAR)
        return out


def _side(pixels: int, scale: float) -> int:
    return max(64, int(round(pixels * scale / 64)) * 64)


@dataclass(frozen=True)
class Rendered:
    """A candidate image that is on disk, with where it came from."""

    frame: int
    seed: int
    quality: str
    key: str
    file: Path
    sha256: str
    seconds: float
    image: Image.Image | None = None  # in memory when just rendered (the scorer reads it without decoding)


class CandidateStore:
    """``candidates/``: one PNG per candidate and ``index.json`` listing them, written as they finish."""

    def __init__(self, folder: Path, setup_id: str):
        self.folder = Path(folder)
        self.setup_id = setup_id
        self.entries: dict[str, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        index = self.folder / INDEX
        if index.is_file():
            import json

            try:
                data = json.loads(index.read_text(encoding="utf-8"))
            except ValueError:
                data = {}
            if data.get("format") == FORMAT and data.get("setup_id") == setup_id:
                self.entries = {e["key"]: e for e in data.get("candidates", []) if "key" in e}
                self.extra = {k: v for k, v in data.items() if k not in ("format", "setup_id", "candidates")}

    def found(self, key: str) -> Rendered | None:
        """A finished candidate with this key whose file is intact."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        path = self.folder / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            return None
        return Rendered(entry["frame"], entry["seed"], entry["quality"], key, path, entry["sha256"], entry["seconds"])

    def add(self, plan: FramePlan, quality: str, key: str, image: Image.Image, seconds: float) -> Rendered:
        """Write one candidate's PNG (atomically) and list it; ``save`` makes the listing durable."""
        name = f"{frame_name(plan.index)}/{quality}-{plan.seed}.png"
        digest = save_png(image, self.folder / name)
        self.entries[key] = {"key": key, "frame": plan.index, "seed": plan.seed, "quality": quality,
                             "width": plan.width, "height": plan.height, "steps": plan.steps, "file": name,
                             "sha256": digest, "seconds": round(seconds, 3)}
        return Rendered(plan.index, plan.seed, quality, key, self.folder / name, digest, seconds, image)

    def keep(self, plan: FramePlan, record: Mapping[str, Any], story_dir: Path,
             scores: Mapping[str, Any] | None = None, ties: FrameTies | None = None) -> Rendered | None:
        """List the story's current picture of ``plan`` (``record``: its manifest entry; about to be replaced by a
        pick) as a full-quality candidate, so it can be picked back; a picture already listed is left as it is.
        A repaired frame is not a candidate (its picture is more than its seed makes): None."""
        if record.get("repairs"):
            return None
        members = [int(i) for i in record.get("batch", [plan.index])]
        key = candidate_key(plan, members, self.setup_id, FULL, ties)
        found = self.found(key)
        if found is not None:
            return found
        name = f"{frame_name(plan.index)}/{FULL}-{plan.seed}.png"
        link_or_copy(Path(story_dir) / str(record["file"]), self.folder / name)
        digest = sha256_file(self.folder / name)
        seconds = float(record.get("seconds", 0.0))
        self.entries[key] = {"key": key, "frame": plan.index, "seed": plan.seed, "quality": FULL,
                             "width": plan.width, "height": plan.height, "steps": plan.steps, "file": name,
                             "sha256": digest, "seconds": round(seconds, 3), **(scores or {})}
        return Rendered(plan.index, plan.seed, FULL, key, self.folder / name, digest, seconds)

    def record_scores(self, key: str, scores: Mapping[str, Any]) -> None:
        self.entries[key].update(scores)

    def save(self) -> None:
        ordered = sorted(self.entries.values(), key=lambda e: (e["frame"], e["quality"], e["seed"]))
        write_json(self.folder / INDEX, {"format": FORMAT, "setup_id": self.setup_id, **self.extra,
                                         "candidates": ordered})


@dataclass(frozen=True)
class _RecordedAdapter:
    """The IP-Adapter as a key sees it: its content hash, as the manifest records it."""

    sha256: str


@dataclass(frozen=True)
class FrameTies:
    """What ties a story's frames together, as its candidates need it: consistent attention (the settings and the
    identity frames' own keys) and the character reference (the frames' keys and the adapter's hash)."""

    attention: SharingSettings | None = None
    identity_keys: dict[int, str] = field(default_factory=dict)
    frame_keys: dict[int, str] = field(default_factory=dict)
    adapter: _RecordedAdapter | None = None

    @classmethod
    def of(cls, plans: Mapping[int, FramePlan], manifest: Mapping[str, Any]) -> FrameTies:
        """From the manifest (the story as it is) and its frames' plans."""
        records = manifest["frames"]
        record = next((r["consistent_attention"] for r in records.values() if r.get("consistent_attention")), None)
        attention = SharingSettings.from_record(record) if record is not None else None
        identity = {i: plan_key(plans[i], [int(m) for m in records[str(i)].get("batch", [i])], manifest["setup_id"],
                                plans[i].sampler, [sha256_bytes(png_bytes(g.image)) for g in plans[i].guides])
                    for i in (attention.identity_frames if attention else ())}
        adapter = manifest.get("ip_adapter")
        return cls(attention, identity, {int(k): r.get("key", "") for k, r in records.items()},
                   _RecordedAdapter(adapter["sha256"]) if adapter else None)

    def key(self, key: str, plan: FramePlan) -> str:
        """A frame's plain key with its sharing and its reference folded in, as a story run does (kstory.story.run)."""
        if self.attention is not None:
            key = sharing_key(key, plan.index, self.attention, self.identity_keys)
        return keyed(key, plan, self.frame_keys, self.adapter)  # type: ignore[arg-type]

    def identity_frames(self) -> list[int]:
        return sorted(self.attention.identity_frames) if self.attention else []

    def reads(self, members: list[int]) -> bool:
        return self.attention is not None and any(self.attention.role(i) == READER for i in members)

    def fills(self, members: list[int]) -> bool:
        return self.attention is not None and any(self.attention.role(i) == IDENTITY for i in members)


def story_batches(plans: Mapping[int, FramePlan], records: Mapping[str, Any]) -> list[list[int]]:
    """The story's batches (frame numbers, in order) as its manifest records them."""
    seen: list[list[int]] = []
    for key in sorted(records, key=int):
        members = [int(i) for i in records[key].get("batch", [int(key)]) if int(i) in plans]
        if members and members not in seen:
            seen.append(members)
    return seen


def candidate_key(plan: FramePlan, members: list[int], setup_id: str, quality: str,
                  ties: FrameTies | None = None) -> str:
    """Like a story frame's key (docs/story.md, with its sharing and reference), plus the quality it was rendered at."""
    guides = [sha256_bytes(png_bytes(g.image)) for g in plan.guides]
    key = plan_key(plan, members, setup_id, plan.sampler, guides)
    key = (ties or FrameTies()).key(key, plan)
    return key + ("" if quality == FULL else f"-{quality}")


def render_round(
    store: CandidateStore, plans: Mapping[int, FramePlan], story: list[list[int]], seeds: Mapping[int, int],
    quality: Quality, session: Callable[[], Session], release: str = "auto", ties: FrameTies | None = None,
) -> Iterator[list[Rendered]]:
    """Render one candidate seed per frame (``seeds``: frame -> seed) in the story's batches, batch by batch.

    Frames not in ``seeds`` ride along with their current seed (their picture is not kept). Candidates
    already in the store are not rendered again; a batch with nothing new is skipped. Batches that read
    the attention bank (``ties``) run after the identity batches, which refill it. Yields the
    candidates of each batch (found or new) once they are on disk; the caller saves the index.
    """
    readers: list[tuple[list[int], list[FramePlan], dict[int, str], dict[int, Rendered | None]]] = []
    for members in story:
        wanted = [i for i in members if i in seeds]
        if not wanted:
            continue
        batch = []
        for index in members:
            plan = copy.copy(plans[index])
            if index in seeds:
                plan.seed = seeds[index]
            batch.append(quality.plan(plan))
        keys = {plan.index: candidate_key(plan, members, store.setup_id, quality.name, ties) for plan in batch}
        found = {i: store.found(keys[i]) for i in wanted}
        if all(found.values()):
            yield [found[i] for i in wanted]  # type: ignore[misc]
        elif ties is not None and ties.reads(members):
            readers.append((members, batch, keys, found))
        else:
            live = session()
            live.encode(batch, release)
            [(_, images, seconds)] = list(live.generate([batch]))  # one story batch: one size and step count
            yield _kept(store, quality, batch, images, seconds, seeds, keys, found)
    if readers:
        assert ties is not None and ties.attention is not None
        identity = [[quality.plan(copy.copy(plans[i])) for i in members] for members in story if ties.fills(members)]
        live = session()
        live.encode([plan for batch in identity for plan in batch] + [p for _, b, _, _ in readers for p in b], release)
        outputs = live.generate(identity + [batch for _, batch, _, _ in readers], AttentionBank(ties.attention))
        for _ in identity:  # the bank's batches: their pictures are the story's own identity frames
            next(outputs)
        for (_, batch, keys, found), (_, images, seconds) in zip(readers, outputs):
            yield _kept(store, quality, batch, images, seconds, seeds, keys, found)


def _kept(store: CandidateStore, quality: Quality, batch: list[FramePlan], images: list[Image.Image], seconds: float,
          seeds: Mapping[int, int], keys: Mapping[int, str], found: Mapping[int, Rendered | None]) -> list[Rendered]:
    """The batch's candidates: those found in the store, the others written to it."""
    out = []
    for plan, image in zip(batch, images):
        if plan.index not in seeds:
            continue
        existing = found[plan.index]
        out.append(existing or store.add(plan, quality.name, keys[plan.index], image, seconds / len(batch)))
    return out


def timer() -> Callable[[], float]:
    """Seconds since the call (for the search's time-to-goal)."""
    start = time.perf_counter()
    return lambda: time.perf_counter() - start
