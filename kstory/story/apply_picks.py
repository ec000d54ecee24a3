"""Put the search's picks into the story: new seeds in the manifest, the candidates' pictures as the frames.

A candidate was rendered in the story's own batch (kstory.story.candidates),
so it already is the frame a story run with its seed makes; it is copied, not
rendered again. The change is built in staging and swapped in whole like a
re-roll (the previous story goes to ``.history/``); each frame keeps its seed
history and records its candidates under ``search``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kstory.core.atomic import write_text
from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.logs import get_logger
from kstory.story.build import StoryBuild
from kstory.story.candidates import Rendered
from kstory.story.generate import FramePlan
from kstory.story.manifest import existing_manifest
from kstory.story.run import frame_record, spec_values
from kstory.story.spec_copy import SPEC_COPY, derive_spec_text
from kstory.story.staging import link_or_copy

log = get_logger("story")


def apply_picks(out_dir: Path, plans: Mapping[int, FramePlan], picks: Mapping[int, Rendered],
                search: Mapping[int, dict[str, Any]]) -> bool:
    """Make each frame of ``picks`` the picked candidate and record ``search`` (frame -> record) per frame.

    ``plans`` are the story's frames as the manifest records them. Returns False when nothing changed
    (same pictures, same records): the story folder is then left exactly as it was.
    """
    out_dir = Path(out_dir)
    manifest = existing_manifest(out_dir)
    records = manifest["frames"]
    new_records: dict[str, Any] = {}
    changed = False
    for key, record in records.items():
        index = int(key)
        fresh = dict(record)
        pick = picks.get(index)
        if pick is not None and pick.sha256 != record["sha256"]:
            fresh = _picked_record(plans[index], pick, record)
        if index in search:
            fresh["search"] = search[index]
        changed |= fresh != record
        new_records[key] = fresh
    if not changed:
        return False
    new = {**manifest, "frames": {}}
    build = StoryBuild(out_dir, manifest)
    build.open()
    for key, record in new_records.items():
        pick = picks.get(int(key))
        if pick is not None and record["sha256"] == pick.sha256 and record["sha256"] != records[key]["sha256"]:
            link_or_copy(pick.file, build.staging / record["file"])
            for guide in record["guides"]:
                link_or_copy(out_dir / guide["file"], build.staging / guide["file"])
            new["frames"][key] = record
        else:
            build.take(out_dir, int(key), records[key], new)
            new["frames"][key] = record
    spec_text = derive_spec_text((out_dir / SPEC_COPY).read_text(encoding="utf-8"), new)
    build.finish(new, lambda folder: write_text(folder / SPEC_COPY, spec_text))
    log.info("story updated with the search's picks: %s", ", ".join(
        f"frame {i} seed {p.seed}" for i, p in sorted(picks.items()) if p.sha256 != records[str(i)]["sha256"]) or
        "same pictures, search records added")
    return True


def _picked_record(plan: FramePlan, pick: Rendered, record: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of ``plan`` drawn with the picked seed (its key is what a story run would compute)."""
    if sha256_file(pick.file) != pick.sha256:
        raise KstoryError("a picked candidate changed on disk", path=pick.file, fix="run `kstory search` again")
    drawn = FramePlan(**{**plan.__dict__, "seed": pick.seed})
    members = list(record.get("batch", [plan.index]))
    spec_seed, spec_prompt = spec_values(record)
    guides = [g["sha256"] for g in record["guides"]]
    extra = {"key": pick.key,  # the candidate's key is the frame's key (kstory.story.candidates.candidate_key)
             "origin": "spec" if pick.seed == spec_seed and plan.frame_prompt == spec_prompt else "search",
             "spec_seed": spec_seed, "spec_frame_prompt": spec_prompt}
    for tie in ("consistent_attention", "ip_adapter"):  # unchanged by a new seed: the settings, the reference
        if record.get(tie):
            extra[tie] = record[tie]
    return frame_record(drawn, pick.sha256, members, record, guides, pick.seconds, extra)
