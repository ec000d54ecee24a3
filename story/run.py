"""``generate_story``: a spec in, frames + guides + story.yaml + manifest.json out.

Bad input is caught before any weights load: spec errors, missing guide
files, unknown ControlNet names or layouts, and a LoRA from another base
model all fail in the first seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from kstory.atomic import copy_file
from kstory.errors import KstoryError
from kstory.logs import get_logger
from kstory.models import KolorsWeights, resolve_model
from story.controlnets import ControlNetWeights, identify
from story.generate import SAMPLER, FramePlan, GuidePlan, Session, batches, default_device, default_dtype
from story.guides.render import render_guide
from story.manifest import (
    FORMAT, frame_name, package_versions, read_manifest, save_png, sha256_bytes, write_manifest,
)
from story.spec import StorySpec, load_spec

log = get_logger("story")
SPEC_COPY = "story.yaml"


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


def check_lora(lora: Path | None, scale: float | None, weights: KolorsWeights) -> LoraChoice | None:
    """Read the LoRA's metadata and refuse one trained on another base model."""
    if lora is None:
        return None
    from train import read_lora

    lora = Path(lora).expanduser().resolve()
    _, metadata = read_lora(lora)
    trained_on = metadata.get("kstory.base_fingerprint", "")
    if trained_on != weights.fingerprint:
        raise KstoryError(
            f"this LoRA was trained on {metadata.get('kstory.base_model') or 'another model'} "
            f"(fingerprint {trained_on[:12] or 'none'}), the story uses {weights.identity} "
            f"(fingerprint {weights.fingerprint[:12]})",
            path=lora, fix="generate with the base model the LoRA was trained on (--model), or train it on this one",
        )
    return LoraChoice(lora, scale, hashlib.sha256(lora.read_bytes()).hexdigest(), metadata)


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
            width=width, height=height, steps=steps, cfg_scale=cfg, guides=guides,
        ))
    return plans


def setup_record(
    model: str, weights: KolorsWeights, lora: LoraChoice | None, lora_info: dict[str, Any] | None,
    controlnets: Mapping[str, ControlNetWeights], device: str, torch_dtype: torch.dtype, batch_size: int,
) -> dict[str, Any]:
    """The manifest's description of the networks and runtime; frames are only comparable within one setup."""
    return {
        "model": {"spec": model, "identity": weights.identity, "fingerprint": weights.fingerprint, "tiny": weights.is_tiny},
        "lora": None if lora is None else {
            "path": str(lora.path), "sha256": lora.sha256, "scale": 1.0 if lora.scale is None else lora.scale,
            "strength": lora_info["strength"] if lora_info else None,
            "rank": int(lora.metadata.get("kstory.rank", 0)), "alpha": float(lora.metadata.get("kstory.alpha", 0)),
            "trigger_word": lora.metadata.get("kstory.trigger_word", ""),
            "base_model": lora.metadata.get("kstory.base_model", ""),
        },
        "controlnets": {name: {"kind": cn.kind, "path": str(cn.path), "sha256": cn.sha256} for name, cn in controlnets.items()},
        "sampler": {"name": SAMPLER, "scheduler": "EnhancedDDIMScheduler", "num_train_timesteps": 1100, "beta_end": 0.014},
        "device": torch.device(device).type, "dtype": str(torch_dtype).removeprefix("torch."), "batch_size": batch_size,
    }


def setup_id(setup: dict[str, Any]) -> str:
    """What must match for frames to sit in one folder: weights, LoRA, sampler, device kind and dtype."""
    keep = {k: setup[k] for k in ("model", "sampler", "device", "dtype")}
    keep["lora"] = None if setup["lora"] is None else {k: setup["lora"][k] for k in ("sha256", "scale")}
    keep["controlnets"] = {name: cn["sha256"] for name, cn in setup["controlnets"].items()}
    keep["model"] = setup["model"]["fingerprint"]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def frame_record(plan: FramePlan, sha256: str, batch: list[int], previous: dict[str, Any] | None,
                 guide_hashes: list[str], seconds: float) -> dict[str, Any]:
    """One frame of the manifest; the seed history carries over from ``previous``."""
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
        "sampler": SAMPLER,
        "batch": batch,
        "guides": [
            {"kind": g.kind, "task": g.task, "file": g.file, "sha256": digest, "controlnet": g.controlnet,
             "scale": g.scale, "start": g.start, "end": g.end, "source": g.source, "notes": g.notes}
            for g, digest in zip(plan.guides, guide_hashes)
        ],
        "seconds": round(seconds, 3),
        "seed_history": history,
    }


def run_plans(
    out_dir: Path, groups: list[list[FramePlan]], keep: set[int], *, session: Session, manifest: dict[str, Any],
    earlier: dict[str, Any], release: str,
) -> tuple[list[int], float, int | None]:
    """Generate the batches ``groups`` into ``out_dir``, writing only frames in ``keep``.

    The manifest is rewritten after every batch (so a crash keeps finished
    frames); ``earlier`` holds the previous manifest's frames, whose seed
    histories continue.
    """
    cuda = str(session.device).startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    plans = [plan for batch in groups for plan in batch]
    guide_hashes = {plan.index: [save_png(g.image, out_dir / g.file) for g in plan.guides]
                    for plan in plans if plan.index in keep}
    session.encode(plans, release)
    generated, seconds = [], 0.0
    for batch, images, batch_seconds in session.generate(groups):
        seconds += batch_seconds
        members = [plan.index for plan in batch]
        for plan, image in zip(batch, images):
            if plan.index not in keep:
                continue
            digest = save_png(image, out_dir / "frames" / f"{frame_name(plan.index)}.png")
            key = str(plan.index)
            manifest["frames"][key] = frame_record(plan, digest, members, earlier.get(key),
                                                   guide_hashes[plan.index], batch_seconds / len(batch))
            generated.append(plan.index)
        manifest["frames"] = dict(sorted(manifest["frames"].items(), key=lambda item: int(item[0])))
        write_manifest(out_dir, manifest)
        log.info("frames %s done in %.1f s", ", ".join(str(i) for i in members if i in keep), batch_seconds)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return generated, seconds, peak


def new_manifest(spec: StorySpec, setup: dict[str, Any], spec_sha256: str, trigger_word: str) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "title": spec.title,
        "frame_count": spec.frame_count,
        "spec": {"file": SPEC_COPY, "sha256": spec_sha256},
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


def generate_story(
    spec_path: Path,
    out_dir: Path,
    *,
    model: str = "tiny",
    lora: Path | None = None,
    lora_scale: float | None = None,
    controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None,
    frames: list[int] | None = None,
    device: str | None = None,
    torch_dtype: torch.dtype | None = None,
) -> StoryResult:
    """Generate the story of ``spec_path`` (or only ``frames``, 1-based) into ``out_dir``.

    Writes ``frames/NN.png``, ``guides/NN-<kind>.png``, ``story.yaml`` (the
    spec as given) and ``manifest.json``. Same spec, weights, device and
    dtype give bit-identical frames. With ``frames``, the other frames of an
    existing folder stay as they are (they must come from the same weights).
    """
    spec_path, out_dir = Path(spec_path).resolve(), Path(out_dir)
    spec = load_spec(spec_path)
    indices = sorted(set(frames)) if frames else list(range(1, spec.frame_count + 1))
    bad = [i for i in indices if not 1 <= i <= spec.frame_count]
    if bad:
        raise KstoryError(f"no frame {bad[0]}: frames are numbered 1..{spec.frame_count}", fix="pick existing frames")
    weights = resolve_model(model, cache_dir)
    lora_choice = check_lora(lora, lora_scale, weights)
    lora_trigger = lora_choice.metadata.get("kstory.trigger_word", "") if lora_choice else ""
    trigger = spec.character.trigger_word or lora_trigger
    if lora_trigger and trigger != lora_trigger:
        log.warning("the spec's trigger word %r differs from the LoRA's %r", trigger, lora_trigger)
    plans = plan_frames(spec, list(range(1, spec.frame_count + 1)), spec_path.parent, trigger)
    groups = [batch for batch in batches(plans, spec.generation.batch_size) if any(p.index in indices for p in batch)]
    needed = {guide.controlnet for batch in groups for plan in batch for guide in plan.guides}
    controlnet_weights = resolve_controlnets(spec, spec_path.parent, controlnets, needed)
    device = device or default_device()
    torch_dtype = torch_dtype or default_dtype(device)

    session = Session.load(weights, lora=lora_choice.path if lora_choice else None, lora_scale=lora_scale,
                      controlnets=controlnet_weights, device=device, torch_dtype=torch_dtype)
    setup = setup_record(model, weights, lora_choice, session.lora_info, controlnet_weights, device, torch_dtype,
                         spec.generation.batch_size)
    spec_bytes = spec_path.read_bytes()
    manifest = new_manifest(spec, setup, sha256_bytes(spec_bytes), trigger)
    previous = read_manifest(out_dir)
    if previous is not None and frames:
        if previous.get("setup_id") != manifest["setup_id"]:
            raise KstoryError(
                "this story folder was generated with other weights, LoRA, ControlNets, device or dtype",
                path=out_dir, fix="regenerate all frames (leave out the frame selection) or use another folder",
            )
        manifest["frames"] = {k: v for k, v in previous["frames"].items() if int(k) not in indices}
    copy_file(spec_path, out_dir / SPEC_COPY)
    generated, seconds, peak = run_plans(out_dir, groups, set(indices), session=session, manifest=manifest,
                                         earlier=previous["frames"] if previous else {},
                                         release=spec.generation.release_text_encoder)
    return result_of(out_dir, manifest, generated, seconds, peak, device)
