"""``generate_story``: a spec in, frames + guides + story.yaml + manifest.json out.

Bad input is caught before any weights load: spec errors, missing guide
files, unknown ControlNet names or layouts, and a LoRA from another base
model all fail in the first seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kstory.core.atomic import write_bytes, write_text
from kstory.core.config import RaySettings
from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.logs import get_logger
from kstory.core.lora_stack import LoraRequest, check_loras
from kstory.core.models import KolorsWeights, resolve_model
from kstory.core.ray_cluster import check_address
from kstory.story.controlnets import ControlNetWeights, identify
from kstory.core.memory import MemoryPlan, describe, plan_memory
from kstory.story.generate import (SAMPLER, FramePlan, GuidePlan, Session, batches, default_device, default_dtype,
                                   text_encoder_dtype)
from kstory.story.guides.render import render_guide
from kstory.story.build import StoryBuild, plan_key
from kstory.story.character_sheet import make_sheet, pending_sheet, reuse_sheet, sheet_key, sheet_of
from kstory.story.consistent_attention import AttentionBank, SharingSettings, sharing_key, split_by_role, with_bank
from kstory.story.manifest import FORMAT, frame_name, package_versions, png_bytes, read_manifest, save_png, sha256_bytes
from kstory.story.reference_records import adapter_record, frame_entry, keyed, reference_plans, resolve_ip_adapter
from kstory.story.references import waves
from kstory.story.face_references import face_keyed, face_plans, resolve_face_adapter, write_face_files
from kstory.story.repair import Repair, apply_repairs, repair_plan, repaired_key
from kstory.story.samplers import sampler_record
from kstory.story.staging import link_or_copy
from kstory.story.spec import StorySpec, load_spec
from kstory.story.spec_copy import SPEC_COPY, derive_spec_text

log = get_logger("story")


@dataclass(frozen=True)
class StoryResult:
    """Where the story landed and how long it took (``peak_vram_bytes`` is None off the GPU)."""

    out_dir: Path
    manifest_path: Path
    frames: dict[int, Path]  # every frame in the folder, by 1-based number
    frame_hashes: dict[int, str]
    generated: list[int]  # the frames this call made
    seconds: float  # denoising + decoding only
    seconds_per_frame: float
    peak_vram_bytes: int | None
    device: str


@dataclass(frozen=True)
class LoraChoice:
    path: Path
    scale: float | None
    sha256: str
    metadata: dict[str, str]
    checkpoint: str | None = None  # the training checkpoint picked on the dashboard; None: the LoRA as given


def check_lora(lora: Path | None, scale: float | None, weights: KolorsWeights,
               checkpoint: str | None = None) -> LoraChoice | None:
    """Read the LoRA's metadata and refuse one trained on another base model."""
    if lora is None:
        return None
    from kstory.core.lora import read_lora

    lora = Path(lora).expanduser().resolve()
    _, metadata = read_lora(lora)
    trained_on = metadata.get("kstory.base_fingerprint", "")
    if trained_on != weights.fingerprint and metadata.get("kstory.base_model") == weights.identity:
        # Same published model or folder, other fingerprint: a LoRA from before content fingerprints, or the
        # weights changed in place. Say so rather than refuse a LoRA that may well be right.
        log.warning("%s was trained on %s with fingerprint %s, which differs from today's %s (LoRAs made before "
                    "kstory hashed weights by content carry the old kind); check the base model is the same",
                    lora.name, weights.identity, trained_on[:12] or "none", weights.fingerprint[:12])
    elif trained_on != weights.fingerprint:
        raise KstoryError(
            f"this LoRA was trained on {metadata.get('kstory.base_model') or 'another model'} "
            f"(fingerprint {trained_on[:12] or 'none'}), the story uses {weights.identity} "
            f"(fingerprint {weights.fingerprint[:12]})",
            path=lora, fix="generate with the base model the LoRA was trained on (--model), or train it on this one",
        )
    return LoraChoice(lora, scale, sha256_file(lora), metadata, checkpoint)


def resolve_controlnets(
    spec: StorySpec, spec_dir: Path, given: Mapping[str, Path] | None, needed: set[str]
) -> dict[str, ControlNetWeights]:
    """Name -> identified weights for every ControlNet a guide uses (given ones override the spec's)."""
    paths = {name: ref.path if ref.path.is_absolute() else spec_dir / ref.path for name, ref in spec.controlnets.items()}
    paths.update({name: Path(path) for name, path in (given or {}).items()})
    missing = sorted(needed - set(paths))
    if missing:
        raise KstoryError(
            f"guides use ControlNet(s) {', '.join(missing)} but none was given (known: {', '.join(sorted(paths)) or 'none'})",
            fix="add them under controlnets: in the spec, pass --controlnet NAME=PATH, or set controlnet: on the guide",
        )
    return {name: identify(name, paths[name]) for name in sorted(needed)}


def guide_controlnet(guide: Any) -> str:
    return guide.controlnet or guide.type


def plan_frames(spec: StorySpec, indices: list[int], spec_dir: Path, trigger_word: str) -> list[FramePlan]:
    """Render every guide of the selected frames and fix each frame's prompt and settings."""
    plans = []
    for index in indices:
        frame = spec.frames[index - 1]
        width, height, steps, cfg = spec.settings(index)
        guides, seen = [], {}
        for guide in frame.guides:
            rendered = render_guide(guide, width, height, spec_dir)
            seen[rendered.kind] = seen.get(rendered.kind, 0) + 1
            suffix = "" if seen[rendered.kind] == 1 else f"-{seen[rendered.kind]}"
            guides.append(GuidePlan(
                kind=rendered.kind, task=rendered.task, controlnet=guide_controlnet(guide), scale=guide.scale,
                start=guide.start, end=guide.end, image=rendered.image,
                file=f"guides/{frame_name(index)}-{rendered.kind}{suffix}.png",
                source=rendered.source, notes=rendered.notes,
            ))
        plans.append(FramePlan(
            index=index, prompt=spec.prompt(index, trigger_word), frame_prompt=frame.prompt,
            negative_prompt=spec.negative_prompt(index), seed=frame.seed,
            width=width, height=height, steps=steps, cfg_scale=cfg, guides=guides, sampler=spec.sampler(index),
        ))
    references, faces = reference_plans(spec, spec_dir, trigger_word), face_plans(spec, spec_dir)
    for plan in plans:
        plan.reference, plan.face = references.get(plan.index), faces.get(plan.index)
    return plans


def setup_record(
    model: str, weights: KolorsWeights, lora: LoraChoice | None,
    controlnets: Mapping[str, ControlNetWeights], device: str, torch_dtype: torch.dtype, batch_size: int,
    memory: MemoryPlan | None = None, sampler: str = SAMPLER, loras: Sequence[Any] = (),
) -> dict[str, Any]:
    """The manifest's description of the networks and runtime; frames are only comparable within one setup.

    ``sampler`` is the spec's default sampler (each frame records its own); ``ddim`` keeps older setup ids.
    ``loras`` are the user's own LoRAs stacked on the story's (``PlannedLora``); recorded only when there are any.

    ``memory`` adds the profile in effect; of its choices only tiled decoding and a text encoder on
    another device or with integer weights change pixels, so only those (when used) join the setup id.
    """
    from kstory.core.lora import lora_strength

    extra: dict[str, Any] = {}
    if memory is not None:
        extra["memory"] = memory.as_record()
        if memory.tiled_vae:
            extra["vae_decode"] = "tiled"
        text_device = "cpu" if memory.text_encoder_device == "cpu" else device
        if torch.device(text_device).type != torch.device(device).type:
            extra["text_encoder"] = f"{text_device}-{str(text_encoder_dtype(text_device, torch_dtype)).removeprefix('torch.')}"
        if memory.text_encoder_quant != "none":
            extra["text_encoder_quant"] = memory.text_encoder_quant  # integer ChatGLM weights: other embeddings
    return {
        "model": {"spec": model, "identity": weights.identity, "fingerprint": weights.fingerprint, "tiny": weights.is_tiny},
        "lora": None if lora is None else {
            "path": str(lora.path), "checkpoint": lora.checkpoint, "sha256": lora.sha256, "scale": 1.0 if lora.scale is None else lora.scale,
            "strength": lora_strength(lora.metadata, lora.scale),
            "rank": int(lora.metadata.get("kstory.rank", 0)), "alpha": float(lora.metadata.get("kstory.alpha", 0)),
            "trigger_word": lora.metadata.get("kstory.trigger_word", ""),
            "base_model": lora.metadata.get("kstory.base_model", ""),
        },
        "controlnets": {name: {"kind": cn.kind, "path": str(cn.path), "sha256": cn.sha256} for name, cn in controlnets.items()},
        "sampler": sampler_record(sampler),
        "device": torch.device(device).type, "dtype": str(torch_dtype).removeprefix("torch."), "batch_size": batch_size,
        **({"loras": [planned.record() for planned in loras]} if loras else {}),
        **extra,
    }


def setup_id(setup: dict[str, Any]) -> str:
    """What must match for frames to sit in one folder: weights, LoRA, sampler, device kind and dtype."""
    keep = {k: setup[k] for k in ("model", "sampler", "device", "dtype")}
    keep["lora"] = None if setup["lora"] is None else {k: setup["lora"][k] for k in ("sha256", "scale")}
    keep["controlnets"] = {name: cn["sha256"] for name, cn in setup["controlnets"].items()}
    keep["model"] = setup["model"]["fingerprint"]
    keep.update({k: setup[k] for k in ("vae_decode", "text_encoder", "text_encoder_quant") if k in setup})  # only when not the default
    if setup.get("loras"):  # the user's LoRAs by content and scale, in merge order; never by path
        keep["loras"] = [{k: lora[k] for k in ("sha256", "scale")} for lora in setup["loras"]]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def frame_record(plan: FramePlan, sha256: str, batch: list[int], previous: dict[str, Any] | None,
                 guide_hashes: list[str], seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    """One frame of the manifest; the seed history carries over from ``previous``.

    ``extra`` holds the frame's key, its origin (spec or reroll) and the seed and prompt the user's spec
    gave it (``spec_seed``, ``spec_frame_prompt``), which decide whether a re-roll still stands.
    """
    history = list(previous.get("seed_history", [])) if previous else []
    attempt = {"seed": plan.seed, "prompt": plan.frame_prompt, "sha256": sha256,
               "at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if not history or (history[-1]["seed"], history[-1]["prompt"]) != (plan.seed, plan.frame_prompt):
        history.append(attempt)
    else:
        history[-1] = attempt
    return {
        "file": f"frames/{frame_name(plan.index)}.png",
        "sha256": sha256,
        "prompt": plan.prompt,
        "frame_prompt": plan.frame_prompt,
        "negative_prompt": plan.negative_prompt,
        "seed": plan.seed,
        "width": plan.width,
        "height": plan.height,
        "steps": plan.steps,
        "cfg_scale": plan.cfg_scale,
        "sampler": plan.sampler,
        "batch": batch,
        "guides": [
            {"kind": g.kind, "task": g.task, "file": g.file, "sha256": digest, "controlnet": g.controlnet,
             "scale": g.scale, "start": g.start, "end": g.end, "source": g.source, "notes": g.notes}
            for g, digest in zip(plan.guides, guide_hashes)
        ],
        "seconds": round(seconds, 3),
        **extra,
        **({"repairs": [r.record() for r in plan.repairs]} if plan.repairs else {}),
        "seed_history": history,
    }


def spec_values(record: dict[str, Any]) -> tuple[int, str]:
    """The seed and frame prompt the user's spec gave a frame when its current picture was made.

    Manifests written before these were recorded fall back to the first attempt in the seed history.
    """
    history = record.get("seed_history") or [{"seed": record["seed"], "prompt": record["frame_prompt"]}]
    return (int(record.get("spec_seed", history[0]["seed"])),
            str(record.get("spec_frame_prompt", history[0]["prompt"])))


def is_rerolled(record: dict[str, Any]) -> bool:
    return (int(record["seed"]), str(record["frame_prompt"])) != spec_values(record)


def carry_rerolls(spec: StorySpec, plans: list[FramePlan], records: Mapping[str, Any], trigger_word: str) -> list[int]:
    """Keep re-rolled frames re-rolled: a frame whose spec entry is unchanged since its re-roll takes the re-roll's
    seed and prompt; a frame the user edited in the spec since then follows the spec. Returns the carried frames."""
    carried = []
    for plan in plans:
        record = records.get(str(plan.index))
        if not record or not is_rerolled(record) or spec_values(record) != (plan.seed, plan.frame_prompt):
            continue
        plan.seed, plan.frame_prompt = int(record["seed"]), str(record["frame_prompt"])
        frame = spec.frames[plan.index - 1]
        original, frame.prompt = frame.prompt, plan.frame_prompt
        plan.prompt = spec.prompt(plan.index, trigger_word)
        frame.prompt = original
        carried.append(plan.index)
    return carried


def attach_repairs(plans: list[FramePlan], given: Mapping[int, list[Repair]], current: dict[str, Any] | None,
                   work: Mapping[int, FrameWork], out_dir: Path) -> bool:
    """Give plans their repairs: the ``given`` ones, and from ``current`` (a full run's story folder) those of every
    frame whose generation is unchanged (same base key), so a repair stays until its frame's spec entry changes."""
    attached = False
    records = (current or {}).get("frames", {})
    for plan in plans:
        record = records.get(str(plan.index)) or {}
        if plan.index in given:
            plan.repairs = list(given[plan.index])
        elif record.get("repairs") and plan.index in work and record.get("base_key") == work[plan.index].key:
            plan.repairs = [Repair.from_record(r, out_dir) for r in record["repairs"]]
        elif record.get("repairs"):
            log.info("frame %d changed since its repair: it is generated from the spec again", plan.index)
        attached = attached or bool(plan.repairs)
    return attached


@dataclass(frozen=True)
class FrameWork:
    """What to do with one frame of a build: its plan, key, record extras, and the guide images as PNG bytes."""

    plan: FramePlan
    key: str
    extra: dict[str, Any]
    guide_pngs: list[bytes]


def frame_work(groups: list[list[FramePlan]], setup: str, origin: Mapping[int, str],
               spec_value: Mapping[int, tuple[int, str]], adapter: Any = None,
               known_keys: Mapping[int, str] | None = None, sharing: SharingSettings | None = None,
               face_adapter: Any = None) -> dict[int, FrameWork]:
    """Key and record extras of every planned frame (guide images encoded once).

    A frame that uses a frame reference keys on that frame's key (from ``groups`` or ``known_keys``). With
    consistent attention a sharing frame's key also covers the settings and the identity frames' keys, and its
    record says so (``consistent_attention``); ``groups`` must then hold the identity batches.
    """
    base, pngs_of = {}, {}
    for batch in groups:
        members = [plan.index for plan in batch]
        for plan in batch:
            pngs_of[plan.index] = [png_bytes(g.image) for g in plan.guides]
            base[plan.index] = plan_key(plan, members, setup, plan.sampler,
                                        [sha256_bytes(d) for d in pngs_of[plan.index]])
    identity_keys = {i: base[i] for i in (sharing.identity_frames if sharing else ()) if i in base}
    work: dict[int, FrameWork] = {}
    keys = dict(known_keys or {})
    for batch in groups:
        for plan in batch:
            key = keyed(sharing_key(base[plan.index], plan.index, sharing, identity_keys), plan, keys, adapter)
            key = face_keyed(key, plan, face_adapter)
            seed, prompt = spec_value[plan.index]
            extra = {"key": key, "origin": origin.get(plan.index, "spec"), "spec_seed": seed,
                     "spec_frame_prompt": prompt}
            if sharing is not None and sharing.role(plan.index):
                extra["consistent_attention"] = sharing.record(plan.index)
            if plan.repairs:  # the generated frame's key stays as base_key; the key covers the repairs too
                extra.update(key=repaired_key(key, plan.repairs), base_key=key)
                key = extra["key"]
            keys[plan.index] = key  # what a frame that uses this one as its reference keys on
            work[plan.index] = FrameWork(plan, key, extra, pngs_of[plan.index])
    return work


def story_batches(plans: list[FramePlan], batch_size: int,
                  sharing: SharingSettings | None = None) -> list[list[FramePlan]]:
    """The batches of a story, in the order they must run: with consistent attention the identity frames' batches
    first (they fill the bank); within that, frames that use a frame reference after the frame they use."""
    return [batch for part in split_by_role(plans, sharing) for wave in waves(part) for batch in batches(wave, batch_size)]


def write_inputs(out_dir: Path, plans: list[FramePlan], keep: set[int],
                 work: Mapping[int, FrameWork]) -> dict[int, list[str]]:
    """Write the guides, repair sources and reference copies of the frames in ``keep``; returns the guide hashes."""
    guide_hashes = {}
    for plan in plans:
        if plan.index not in keep:
            continue
        guide_hashes[plan.index] = [sha256_bytes(data) for data in work[plan.index].guide_pngs]
        for guide, data in zip(plan.guides, work[plan.index].guide_pngs):
            write_bytes(out_dir / guide.file, data)
        for repair in plan.repairs:
            for name, source in repair.files.items():
                if not (out_dir / name).is_file():
                    link_or_copy(source, out_dir / name)
    for plan in plans:
        if plan.index in keep and plan.reference is not None and plan.reference.file:
            write_bytes(out_dir / plan.reference.file, plan.reference.data)
    return guide_hashes


def encoded_plans(plans: list[FramePlan], keep: set[int]) -> list[FramePlan]:
    """Every plan whose prompts the text encoder must see: the frames, and the repairs of the frames kept."""
    return plans + [repair_plan(p, r) for p in plans if p.index in keep for r in p.repairs]


def record_batch(out_dir: Path, batch: list[FramePlan], images: list[Any], batch_seconds: float, keep: set[int], *,
                 manifest: dict[str, Any], earlier: dict[str, Any], guide_hashes: Mapping[int, list[str]],
                 work: Mapping[int, FrameWork], adapter: Any, faces: Any = None) -> list[int]:
    """Save the kept frames of one finished batch (repairs already applied) and record them in ``manifest``."""
    members, written = [plan.index for plan in batch], []
    for plan, image in zip(batch, images):
        if plan.index not in keep:
            continue
        digest = save_png(image, out_dir / "frames" / f"{frame_name(plan.index)}.png")
        key = str(plan.index)
        manifest["frames"][key] = frame_record(plan, digest, members, earlier.get(key), guide_hashes[plan.index],
                                               batch_seconds / len(batch), work[plan.index].extra)
        if plan.reference is not None:
            manifest["frames"][key]["ip_adapter"] = frame_entry(plan.reference, adapter)
        if plan.face is not None:
            manifest["frames"][key]["face_id"] = plan.face.entry(faces)
        written.append(plan.index)
    return written


def run_plans(
    out_dir: Path, groups: list[list[FramePlan]], keep: set[int], *, session: Session, manifest: dict[str, Any],
    earlier: dict[str, Any], release: str, work: Mapping[int, FrameWork], save: Callable[[dict[str, Any]], None],
    sharing: SharingSettings | None = None,
) -> tuple[list[int], float, int | None]:
    """Generate the batches ``groups`` into ``out_dir``, writing only frames in ``keep``.

    ``save`` writes the manifest after every batch (so an interrupted run keeps finished frames);
    ``earlier`` holds the previous manifest's frames, whose seed histories continue.
    """
    cuda = str(session.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    plans = [plan for batch in groups for plan in batch]
    sheet = pending_sheet(plans, keep)
    session.encode(encoded_plans(plans, keep) + ([sheet.plan] if sheet and sheet.plan else []), release)
    if sheet is not None:  # alone and first: the frames then take it as their reference picture
        make_sheet(session, sheet, plans, manifest, release)
    guide_hashes = write_inputs(out_dir, plans, keep, work)
    session.references.encode(plans)  # the image encoder's phase, before the UNet loads (unless a sheet loaded it)
    write_face_files(out_dir, plans, keep)
    session.faces.encode(plans)  # the face encoder's phase, before the UNet loads too
    session.references.frame_file = lambda index: out_dir / "frames" / f"{frame_name(index)}.png"
    generated, seconds = [], 0.0
    bank = AttentionBank(sharing) if sharing is not None else None
    for batch, images, batch_seconds in session.generate(groups, bank):
        seconds += batch_seconds
        images = [apply_repairs(session, plan, image) if plan.index in keep and plan.repairs else image
                  for plan, image in zip(batch, images)]
        generated += record_batch(out_dir, batch, images, batch_seconds, keep, manifest=manifest, earlier=earlier,
                                  guide_hashes=guide_hashes, work=work, adapter=session.references.weights,
                                  faces=session.faces.weights)
        save(manifest)
        log.info("frames %s done in %.1f s", ", ".join(str(p.index) for p in batch if p.index in keep), batch_seconds)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return generated, seconds, peak


def new_manifest(spec: StorySpec, setup: dict[str, Any], spec_sha256: str, trigger_word: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "title": spec.title,
        "frame_count": spec.frame_count,
        "spec": {"file": SPEC_COPY, "source_sha256": spec_sha256},
        "trigger_word": trigger_word,
        "setup_id": setup_id(setup),
        **setup,
        "versions": package_versions(),
        "frames": {},
    }


def result_of(out_dir: Path, manifest: dict[str, Any], generated: list[int], seconds: float,
              peak: int | None, device: str) -> StoryResult:
    frames = {int(k): out_dir / v["file"] for k, v in manifest["frames"].items()}
    hashes = {int(k): v["sha256"] for k, v in manifest["frames"].items()}
    per_frame = seconds / len(generated) if generated else 0.0
    return StoryResult(out_dir, out_dir / "manifest.json", frames, hashes, sorted(generated), seconds, per_frame, peak, device)


def build_story(
    build: StoryBuild, manifest: dict[str, Any], groups: list[list[FramePlan]], wanted: set[int],
    work: Mapping[int, FrameWork], *, load_session: Callable[[], Session], spec_text: str, release: str, device: str,
    sharing: SharingSettings | None = None, ray: RaySettings | None = None,
) -> StoryResult:
    """Make the frames ``wanted`` in ``build``'s staging folder (reusing unchanged ones) and swap it in.

    Frames outside ``wanted`` must already be in ``manifest`` (taken from the story folder).
    With ``ray``, the batches are denoised on a pool of Ray workers (kstory.story.ray_story), same pixels.
    """
    to_make = set()
    for index in sorted(wanted):
        found = build.reusable(index, work[index].key)
        if found is None:
            to_make.add(index)
        else:
            build.take(found[0], index, found[1], manifest)
    log.info("%d frame(s) unchanged and kept, %d to generate", len(wanted) - len(to_make), len(to_make))
    build.save(manifest)
    spec_copy_text = derive_spec_text(spec_text, manifest) if not to_make else None
    if not to_make and build.unchanged(manifest, spec_copy_text, SPEC_COPY):
        build.abandon(manifest)  # its manifest may name older places: files are found by hash
        log.info("story up to date: every frame matches its inputs, nothing generated (%s)", build.out_dir)
        return result_of(build.out_dir, manifest, [], 0.0, None, device)
    generated, seconds, peak = [], 0.0, None
    if to_make:
        groups = with_bank(groups, to_make, sharing)
        earlier = dict((build.current or {}).get("frames", {}))
        if ray is not None and _ray_story().use_ray(ray):
            generated, seconds, peak = _ray_story().run_plans_on_ray(
                build.staging, groups, to_make, settings=ray, load_session=load_session, manifest=manifest,
                earlier=earlier, release=release, work=work, save=build.save, sharing=sharing, device=device)
        else:
            generated, seconds, peak = run_plans(build.staging, groups, to_make, session=load_session(),
                                                 manifest=manifest, earlier=earlier, release=release, work=work,
                                                 save=build.save, sharing=sharing)
    text = derive_spec_text(spec_text, manifest)
    build.finish(manifest, lambda folder: write_text(folder / SPEC_COPY, text))
    return result_of(build.out_dir, manifest, generated, seconds, peak, device)


def _ray_story() -> Any:
    import kstory.story.ray_story as ray_story  # imports this module: loaded only when Ray is configured

    return ray_story


def generate_story(
    spec_path: Path,
    out_dir: Path,
    *,
    model: str = "tiny",
    lora: Path | None = None,
    lora_scale: float | None = None,
    lora_checkpoint: str | None = None,
    controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None,
    frames: list[int] | None = None,
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
    memory: str = "auto",
    text_encoder_device: str = "auto",
    repairs: Mapping[int, list[Repair]] | None = None,
    ip_adapter: str | Path | None = None,
    text_encoder_quant: str = "none",
    loras: Sequence[LoraRequest] = (),
    face_adapter: str | Path | None = None,
    ray: RaySettings | None = None,
) -> StoryResult:
    """Generate the story of ``spec_path`` (or only ``frames``, 1-based) into ``out_dir``.

    Writes ``frames/NN.png``, ``guides/NN-<kind>.png``, ``story.yaml`` (the
    spec as last generated), ``manifest.json`` and, with a generated character
    sheet, ``character-sheet.png`` (made first), all through a staging folder
    swapped in at the end (the previous story goes to the run's ``.history/``).
    Frames whose inputs are unchanged are kept, not regenerated; a full run
    keeps re-rolled frames whose spec entry is unchanged. Same spec, weights,
    device and dtype give bit-identical frames. With ``frames``, the other
    frames of an existing folder stay as they are (same weights required).
    ``memory`` is a profile of :mod:`kstory.core.memory` (``auto``: picked from the free memory); it decides
    the dtype when ``torch_dtype`` is not given and caps the frames per batch. ``text_encoder_device="cpu"``
    encodes the prompts on the CPU whatever the profile says; ``text_encoder_quant`` (int8, int4) quantises
    ChatGLM's linear weights with torchao.
    ``lora_checkpoint`` names the training checkpoint ``lora`` comes from (recorded in the manifest).
    ``repairs`` (frame -> recorded repairs, as ``kstory verify`` passes them) are replayed on those frames; a full
    run also keeps the repairs of every frame whose generation is unchanged (kstory.story.repair).
    ``ip_adapter`` (a Kolors-IP-Adapter-Plus folder, or ``"tiny"``) overrides the spec's ``character.reference.adapter``.
    ``loras`` are the user's own LoRA files, each with its scale, stacked on ``lora`` in order (docs/story.md).
    ``face_adapter`` (a Kolors-IP-Adapter-FaceID-Plus folder, or ``"tiny"``) overrides ``character.face.adapter``.
    ``ray`` denoises the batches on a pool of Ray workers (docs/scale-out.md): the same frames, bit for bit.
    """
    if ray is not None:
        check_address(ray.address, _ray_story().SETTING)
    spec_path, out_dir = Path(spec_path).resolve(), Path(out_dir)
    spec = load_spec(spec_path)
    indices = sorted(set(frames)) if frames else list(range(1, spec.frame_count + 1))
    bad = [i for i in indices if not 1 <= i <= spec.frame_count]
    if bad:
        raise KstoryError(f"no frame {bad[0]}: frames are numbered 1..{spec.frame_count}", fix="pick existing frames")
    weights = resolve_model(model, cache_dir)
    lora_choice = check_lora(lora, lora_scale, weights, lora_checkpoint)
    planned = check_loras(loras, weights, own_scale=(1.0 if lora_scale is None else lora_scale) if lora_choice else None)
    lora_trigger = lora_choice.metadata.get("kstory.trigger_word", "") if lora_choice else ""
    trigger = spec.character.trigger_word or lora_trigger
    if lora_trigger and trigger != lora_trigger:
        log.warning("the spec's trigger word %r differs from the LoRA's %r", trigger, lora_trigger)
    plans = plan_frames(spec, list(range(1, spec.frame_count + 1)), spec_path.parent, trigger)
    adapter = resolve_ip_adapter(spec, spec_path.parent, ip_adapter, cache_dir)
    faces = resolve_face_adapter(spec, spec_path.parent, face_adapter, cache_dir)
    from_spec = {plan.index: (plan.seed, plan.frame_prompt) for plan in plans}
    current = read_manifest(out_dir)
    origin: dict[int, str] = {}
    if frames is None and current is not None:
        carried = carry_rerolls(spec, plans, current.get("frames", {}), trigger)
        origin = {index: "reroll" for index in carried}
        if carried:
            log.info("keeping the re-rolled seed or prompt of frame(s) %s", ", ".join(map(str, carried)))
    sharing = SharingSettings.from_spec(spec)
    if frames and sharing is not None:
        indices = readers_too(indices, sharing)
    groups = story_batches(plans, spec.generation.batch_size, sharing)
    if frames:
        groups = with_bank(groups, set(indices), sharing)
    needed = {guide.controlnet for batch in groups for plan in batch for guide in plan.guides}
    controlnet_weights = resolve_controlnets(spec, spec_path.parent, controlnets, needed)
    device = device or default_device()
    memory_plan = plan_memory(memory, weights, task="story", device=device, frames=spec.generation.batch_size,
                              pixels=max(p.width * p.height for p in plans),
                              controlnets=[cn.path for cn in controlnet_weights.values()],
                              frame_controlnets=[[controlnet_weights[guide.controlnet].path for guide in plan.guides]
                                                 for batch in groups for plan in batch],
                              text_encoder_device=text_encoder_device, text_encoder_quant=text_encoder_quant)
    log.info("%s", describe(memory_plan, "story"))
    batch_size = min(spec.generation.batch_size, memory_plan.max_batch or spec.generation.batch_size)
    if batch_size < spec.generation.batch_size:  # smaller batches may need fewer ControlNets
        groups = story_batches(plans, batch_size, sharing)
        if frames:
            groups = with_bank(groups, set(indices), sharing)
        needed = {guide.controlnet for batch in groups for plan in batch for guide in plan.guides}
        controlnet_weights = {name: cn for name, cn in controlnet_weights.items() if name in needed}
    torch_dtype = torch_dtype or default_dtype(device, memory_plan)
    setup = setup_record(model, weights, lora_choice, controlnet_weights, device, torch_dtype, batch_size,
                         memory_plan, sampler=spec.defaults.sampler, loras=planned)
    spec_bytes = spec_path.read_bytes()
    manifest = new_manifest(spec, setup, sha256_bytes(spec_bytes), trigger)
    if adapter is not None:
        manifest["ip_adapter"] = adapter_record(adapter, str(ip_adapter or spec.character.reference.adapter) == "tiny")
    if faces is not None:
        manifest["face_adapter"] = {**faces.record(), "tiny": str(face_adapter or spec.character.face.adapter) == "tiny"}
    if current is not None and frames:
        if current.get("setup_id") != manifest["setup_id"]:
            raise KstoryError(
                "this story folder was generated with other weights, LoRA, ControlNets, device or dtype",
                path=out_dir, fix="regenerate all frames (leave out the frame selection) or use another folder",
            )
    sheet = sheet_of(plans)
    if sheet is not None and sheet.plan is not None:  # the frames that use it key on its key
        sheet.key = sheet_key(sheet.plan, manifest["setup_id"])
    known = {int(k): r.get("key", "") for k, r in (current or {}).get("frames", {}).items()}
    work = frame_work(groups, manifest["setup_id"], origin, from_spec, adapter, known, sharing, faces)
    if attach_repairs(plans, repairs or {}, current if frames is None else None, work, out_dir):
        work = frame_work(groups, manifest["setup_id"], origin, from_spec, adapter, known, sharing, faces)
    build = StoryBuild(out_dir, current)
    build.open()
    if sheet is not None:
        reuse_sheet(build, sheet, plans, manifest)
    if current is not None and frames:
        for key, record in current["frames"].items():
            if int(key) not in indices:
                build.take(out_dir, int(key), record, manifest)

    def load_session() -> Session:
        return Session.load(weights, lora=lora_choice.path if lora_choice else None, lora_scale=lora_scale,
                            controlnets=controlnet_weights, device=device, torch_dtype=torch_dtype,
                            memory=memory_plan, ip_adapter=adapter, loras=planned, face_adapter=faces)

    return build_story(build, manifest, groups, set(indices), work, load_session=load_session,
                       spec_text=spec_bytes.decode("utf-8"), release=spec.generation.release_text_encoder,
                       device=device, sharing=sharing, ray=ray)


def readers_too(indices: list[int], sharing: SharingSettings) -> list[int]:
    """A partial run that remakes an identity frame remakes the frames reading its bank too."""
    if not any(sharing.role(i) == "identity" for i in indices):
        return indices
    added = sorted(set(sharing.identity_frames + sharing.readers) - set(indices))
    if added:
        log.info("frame(s) %s share attention with the identity frames being made, so they are made too",
                 ", ".join(map(str, added)))
    return sorted(set(indices) | set(added))
