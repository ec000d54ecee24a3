"""A reviewer's pick: make another of a searched frame's candidates the frame, without rendering.

The best-of-N search (``kstory search``) chooses one candidate per frame; a
reviewer may prefer another. The candidate's picture in ``candidates/`` is
already the frame a story run with its seed makes (kstory.story.candidates),
so it goes into the story through the same staging path as the search's own
picks (kstory.story.apply_picks): the previous story goes to ``.history/``,
the seed joins the frame's seed history, and the frame's ``search`` record
names the new pick with ``picked_by: review``. The replaced picture stays
among the candidates, so it can be picked back.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.story import review
from kstory.story.apply_picks import apply_picks
from kstory.story.candidates import FULL, CandidateStore, FrameTies, candidate_key, candidates_dir
from kstory.story.manifest import existing_manifest
from kstory.story.reroll_frame import plan_from_record

REVIEW = "review"


def pick_candidate(story_dir: Path, frame: int, seed: int) -> bool:
    """Make candidate ``seed`` of ``frame`` the story's frame; False when it already is.

    Refused, with the fix, when the frame is locked, was never searched, has no
    full-quality candidate with that seed, or the candidate's picture is gone
    or was made for another setup, batch, prompt or guide than the frame's now.
    """
    story_dir = Path(story_dir)
    manifest = existing_manifest(story_dir)
    records = manifest["frames"]
    record = records.get(str(frame))
    where = story_dir / "manifest.json"
    if record is None:
        raise KstoryError(f"the story has no frame {frame}", path=where, fix=f"pick one of {', '.join(records)}")
    if str(frame) in review.load(story_dir).locked:
        raise KstoryError(f"frame {frame} is locked", path=story_dir / review.FILE,
                          fix="unlock it (the dashboard's Story or Candidates page) to pick another candidate")
    search = record.get("search")
    if not isinstance(search, dict):
        raise KstoryError(f"frame {frame} was never searched", path=where,
                          fix="run `kstory search` on the run first")
    if not any(c.get("seed") == seed and c.get("quality") == FULL for c in search.get("candidates", [])):
        raise KstoryError(f"seed {seed} is not a full-quality candidate of frame {frame}", path=where,
                          fix="pick a seed from the frame's search record (full quality)")
    if int(record["seed"]) == seed and search.get("pick") == seed:
        return False
    plans = {int(k): plan_from_record(story_dir, int(k), r) for k, r in records.items()}
    members = [int(i) for i in record.get("batch", [frame])]
    store = CandidateStore(candidates_dir(story_dir), manifest["setup_id"])
    wanted = copy.copy(plans[frame])
    wanted.seed = seed
    ties = FrameTies.of(plans, manifest)
    found = store.found(candidate_key(wanted, members, manifest["setup_id"], FULL, ties))
    if found is None:
        raise KstoryError(f"candidate seed {seed} of frame {frame} is not on disk for this story as it is now",
                          path=candidates_dir(story_dir),
                          fix=f"run `kstory search` again (it renders missing candidates) or re-roll frame {frame} "
                              f"with seed {seed} (`kstory reroll`)")
    if found.sha256 != record["sha256"]:
        store.keep(plans[frame], record, story_dir, _scores(search, int(record["seed"])), ties)
    changed = apply_picks(story_dir, plans, {frame: found}, {frame: {**search, "pick": seed, "picked_by": REVIEW}})
    store.save()
    return changed


def _scores(search: dict[str, Any], seed: int) -> dict[str, Any]:
    entry = next((c for c in search.get("candidates", []) if c.get("seed") == seed and c.get("quality") == FULL), {})
    return {name: entry[name] for name in ("aesthetic", "clip_t") if name in entry}
