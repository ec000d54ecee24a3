"""Re-roll one frame (new seed or edited prompt) and leave every other frame's file untouched.

The frame's original batch is run again with the same companions (their
seeds, prompts and saved guides come from the manifest), because a frame's
last bits depend on its batch; so the new frame is exactly what a full run
with the new seed would give. Only the re-rolled frame is written; its
manifest entry keeps the history of every seed tried.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.seeds import SEED_LIMIT
from kstory.story.consistent_attention import SharingSettings, bank_batches
from kstory.story.generate import SAMPLER, FramePlan, GuidePlan
from kstory.story.manifest import existing_manifest, manifest_frame
from kstory.story.build import StoryBuild
from kstory.story.recorded_setup import recorded_session, verified
from kstory.story.run import StoryResult, build_story, frame_work, spec_values
from kstory.story.spec_copy import SPEC_COPY
from kstory.story.reference_records import find_recorded_adapter, plan_from_entry
from kstory.story.spec import load_spec

log = get_logger("story")


def plan_from_record(out_dir: Path, index: int, record: dict[str, Any]) -> FramePlan:
    if record.get("face_id"):  # refused rather than made again without the face
        raise KstoryError(f"frame {index} was made with a face (FaceID-Plus): re-rolling or repairing it alone is not "
                          "supported yet", path=out_dir / "manifest.json",
                          fix="change the frame's seed in the spec and run kstory story")
    guides = []
    for g in record["guides"]:
        with Image.open(verified(out_dir / g["file"], g["sha256"], "guide image")) as handle:
            image = handle.convert("RGB")
        guides.append(GuidePlan(kind=g["kind"], task=g["task"], controlnet=g["controlnet"], scale=g["scale"],
                                start=g["start"], end=g["end"], image=image, file=g["file"], source=g["source"],
                                notes=g["notes"]))
    return FramePlan(index=index, prompt=record["prompt"], frame_prompt=record["frame_prompt"],
                     negative_prompt=record["negative_prompt"], seed=record["seed"], width=record["width"],
                     height=record["height"], steps=record["steps"], cfg_scale=record["cfg_scale"], guides=guides,
                     sampler=record.get("sampler", SAMPLER),
                     reference=plan_from_entry(record["ip_adapter"], out_dir) if record.get("ip_adapter") else None)


def reroll(
    out_dir: Path,
    frame: int,
    *,
    seed: int | None = None,
    prompt: str | None = None,
    controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None,
    ip_adapter: str | Path | None = None,
) -> StoryResult:
    """Generate frame ``frame`` (1-based) of the story in ``out_dir`` again.

    With neither ``seed`` nor ``prompt`` a fresh random seed is drawn; with
    only ``prompt`` the seed stays. Weights, LoRA and ControlNets are the
    ones the manifest records (checked by hash; ``controlnets`` may point at
    moved copies, ``ip_adapter`` a moved IP-Adapter). The new frame is built in staging and swapped in with the
    rest of the story; the previous story goes to the run's ``.history/``, the
    manifest and ``story.yaml`` record the new seed and prompt. Returns the
    folder's state; ``generated`` is ``[frame]``.
    """
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise KstoryError(f"seed {seed} is out of range", fix=f"use a seed from 0 to {SEED_LIMIT - 1} (see docs/story.md)")
    out_dir = Path(out_dir)
    manifest = existing_manifest(out_dir)
    records = manifest["frames"]
    record = manifest_frame(manifest, frame, out_dir)
    tried = {entry["seed"] for entry in record.get("seed_history", [])}
    if seed is None and prompt is None:
        seed = next(s for s in iter(lambda: secrets.randbelow(2**31), None) if s not in tried)
    spec_text = (out_dir / SPEC_COPY).read_text(encoding="utf-8")
    spec = load_spec(out_dir / SPEC_COPY)

    companions = [i for i in record.get("batch", [frame]) if str(i) in records]
    plans = [plan_from_record(out_dir, i, records[str(i)]) for i in companions]
    target = next(plan for plan in plans if plan.index == frame)
    sharing = SharingSettings.from_record(record["consistent_attention"]) if record.get("consistent_attention") else None
    bank = bank_batches(frame, sharing, records, out_dir)
    groups = [[plan_from_record(out_dir, i, records[str(i)]) for i in batch] for batch in bank] + [plans]
    if seed is not None:
        target.seed = seed
    if prompt is not None:
        spec.frames[frame - 1].prompt = prompt
        target.frame_prompt = prompt
        target.prompt = spec.prompt(frame, manifest.get("trigger_word", ""))

    adapter = find_recorded_adapter(manifest.get("ip_adapter"), ip_adapter, cache_dir)
    needed = {guide.controlnet for batch in groups for plan in batch for guide in plan.guides}
    load_session = recorded_session(out_dir, manifest, needed, controlnets=controlnets, cache_dir=cache_dir,
                                    ip_adapter=adapter)

    spec_value = {plan.index: spec_values(records[str(plan.index)]) for batch in groups for plan in batch}
    origin = {frame: "reroll" if (target.seed, target.frame_prompt) != spec_value[frame] else "spec"}
    known = {int(k): r.get("key", "") for k, r in records.items()}
    work = frame_work(groups, manifest["setup_id"], origin, spec_value, adapter, known, sharing)
    sources = {((r.get("ip_adapter") or {}).get("reference") or {}).get("frame") for r in records.values()}
    if frame in sources:
        log.warning("frame %d is the character reference: the frames that use it keep the old picture until "
                    "`kstory story` makes them again", frame)
    new = {**manifest, "frames": {}}
    build = StoryBuild(out_dir, manifest)
    build.open()
    for key, other in records.items():
        if int(key) != frame:
            build.take(out_dir, int(key), other, new)

    log.info("re-rolling frame %d with seed %d (batch %s)", frame, target.seed, companions)
    return build_story(build, new, groups, {frame}, work, load_session=load_session, spec_text=spec_text,
                       release=spec.generation.release_text_encoder, device=manifest["device"], sharing=sharing)
