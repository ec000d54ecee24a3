"""Repair one frame of a story folder: ``kstory reroll --strength`` (img2img) and ``kstory inpaint`` (a mask).

The repair starts from the frame's current picture (or a given one), runs
alone, and is recorded on the frame (kstory.story.repair); the other frames
are untouched. Like a re-roll it is built in staging and swapped in whole,
and the previous story goes to the run's ``.history/``.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from PIL import Image

from kstory.core.atomic import write_text
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.seeds import SEED_LIMIT
from kstory.story.build import StoryBuild
from kstory.story.manifest import frame_name, png_bytes, existing_manifest, manifest_frame, save_png, sha256_bytes
from kstory.story.masks import DEFAULT_THRESHOLD, read_mask
from kstory.story.reference_records import find_recorded_adapter
from kstory.story.repair import (KINDS, REPAIRS_DIR, Repair, SourceEncoder, apply_repair, check_strength,
                                 load_picture, repair_plan, repaired_key)
from kstory.story.recorded_setup import recorded_session
from kstory.story.reroll_frame import plan_from_record
from kstory.story.run import StoryResult, result_of
from kstory.story.samplers import check_sampler
from kstory.story.spec import load_spec
from kstory.story.spec_copy import SPEC_COPY, derive_spec_text

log = get_logger("story")


def repair_frame(
    out_dir: Path, frame: int, *, kind: str, strength: float, seed: int | None = None, prompt: str | None = None,
    mask: Path | None = None, from_image: Path | None = None, feather: int = 8, crop_padding: int | None = None,
    threshold: int = DEFAULT_THRESHOLD, sampler: str | None = None, controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None, inpaint_model: str | Path | None = None,
) -> StoryResult:
    """Repair frame ``frame`` (1-based) of the story in ``out_dir``; see the module docstring.

    ``kind`` is ``img2img`` or ``inpaint`` (which needs ``mask``: white is repainted). Without ``seed`` a fresh
    one is drawn; without ``prompt`` the frame's prompt stays; without ``sampler`` the frame's. ``from_image``
    starts from another picture instead of the frame. ``feather`` (pixels) softens the mask's edge,
    ``crop_padding`` (pixels) inpaints only the box around the mask, at full resolution. ``inpaint_model`` (a
    Kwai-Kolors/Kolors-Inpainting folder, or 'tiny') inpaints with that 9-channel UNet instead of blending.
    """
    if kind not in KINDS:
        raise KstoryError(f"unknown repair {kind!r}", fix=f"use one of {', '.join(KINDS)}")
    strength = check_strength(strength)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise KstoryError(f"seed {seed} is out of range", fix=f"use a seed from 0 to {SEED_LIMIT - 1}")
    if feather < 0 or (crop_padding is not None and crop_padding < 0):
        raise KstoryError("feather and crop padding are pixels and cannot be negative", fix="give 0 or more")
    out_dir = Path(out_dir)
    manifest = existing_manifest(out_dir)
    records = manifest["frames"]
    record = manifest_frame(manifest, frame, out_dir)
    plan = plan_from_record(out_dir, frame, record)
    picture = load_picture(out_dir / record["file"], f"frame {frame}", record["sha256"])
    earlier = [Repair.from_record(r, out_dir) for r in record.get("repairs", [])]
    last = earlier[-1] if earlier else None
    number = len(earlier) + 1
    stem = f"{REPAIRS_DIR}/{frame_name(frame)}-{number}"

    if seed is None:
        tried = {entry["seed"] for entry in record.get("seed_history", [])}
        seed = next(s for s in iter(lambda: secrets.randbelow(2**31), None) if s not in tried)
    frame_prompt = last.frame_prompt if last else record["frame_prompt"]
    full_prompt = last.prompt if last else record["prompt"]
    if prompt is not None:
        spec = load_spec(out_dir / SPEC_COPY)
        spec.frames[frame - 1].prompt = frame_prompt = prompt
        full_prompt = spec.prompt(frame, manifest.get("trigger_word", ""))
    repair = Repair(kind=kind, strength=strength, seed=seed, frame_prompt=frame_prompt, prompt=full_prompt,
                    negative_prompt=record["negative_prompt"], sampler=check_sampler(sampler or plan.sampler),
                    steps=record["steps"], cfg_scale=record["cfg_scale"], feather=feather if kind == "inpaint" else 0,
                    crop_padding=crop_padding if kind == "inpaint" else None)
    size = (plan.width, plan.height)
    source = None
    if from_image is not None:
        source = load_picture(Path(from_image), "the picture to start from")
        if source.size != size:
            log.warning("%s is %dx%d, the frame %dx%d: resized to the frame", Path(from_image).name, *source.size, *size)
            source = source.resize(size, Image.LANCZOS)
        repair.source_file, repair.source_sha256 = f"{stem}-source.png", sha256_bytes(png_bytes(source))
    binary = None
    if kind == "inpaint":
        if mask is None:
            raise KstoryError("inpainting needs a mask", fix="pass --mask MASK.png (white: repaint, black: keep)")
        read = read_mask(Path(mask), size, threshold)
        binary = read.image()
        repair.mask_file, repair.mask_sha256 = f"{stem}-mask.png", sha256_bytes(png_bytes(binary))
        repair.threshold, repair.whole_frame = read.threshold, read.whole_frame
    elif mask is not None:
        raise KstoryError("a mask is for inpainting", fix="use `kstory inpaint` for a masked repair")
    if inpaint_model is not None:
        if kind != "inpaint":
            raise KstoryError("an inpainting model is for inpainting", fix="use `kstory inpaint --inpaint-model`")
        from kstory.story.inpaint_model import resolve_inpaint_model

        chosen = resolve_inpaint_model(inpaint_model, cache_dir)
        repair.inpaint_model, repair.inpaint_path = chosen.record(), chosen.spec

    # A frame made with the character reference is repaired with it too.
    adapter = find_recorded_adapter(manifest.get("ip_adapter"), None, cache_dir) if plan.reference else None
    load_session = recorded_session(out_dir, manifest, {guide.controlnet for guide in plan.guides},
                                    controlnets=controlnets, cache_dir=cache_dir, ip_adapter=adapter)
    new = {**manifest, "frames": {}}
    build = StoryBuild(out_dir, manifest)
    build.open()
    for key, other in records.items():
        build.take(out_dir, int(key), other, new)
    for name, image in ((repair.source_file, source), (repair.mask_file, binary)):
        if name:
            save_png(image, build.staging / name)
            repair.files[name] = build.staging / name
    log.info("%s of frame %d: strength %g, seed %d, sampler %s", kind, frame, strength, seed, repair.sampler)
    session = load_session()
    session.encode([repair_plan(plan, repair)])
    session.references.frame_file = lambda index: out_dir / "frames" / f"{frame_name(index)}.png"
    session.references.encode([plan])  # the image encoder's phase, before the UNet loads
    encoder = SourceEncoder(session)
    try:
        image = apply_repair(session, encoder, plan, repair, picture)
    finally:
        encoder.free()
    repair.at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    digest = save_png(image, build.staging / record["file"])
    repairs = [*earlier, repair]
    base_key = record.get("base_key", record["key"])
    history = list(record.get("seed_history", []))
    history.append({"seed": seed, "prompt": frame_prompt, "sha256": digest, "at": repair.at, "repair": kind})
    new["frames"][str(frame)] = {**record, "sha256": digest, "key": repaired_key(base_key, repairs),
                                 "base_key": base_key, "repairs": [r.record() for r in repairs],
                                 "seed_history": history}
    spec_text = (out_dir / SPEC_COPY).read_text(encoding="utf-8")
    build.finish(new, lambda folder: write_text(folder / SPEC_COPY, derive_spec_text(spec_text, new)))
    return result_of(out_dir, new, [frame], 0.0, None, manifest["device"])
