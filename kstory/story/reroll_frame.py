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

import torch
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.models import resolve_model
from kstory.core.seeds import SEED_LIMIT
from kstory.story.controlnets import identify
from kstory.story.generate import FramePlan, GuidePlan, Session, recorded_memory
from kstory.core.hashing import sha256_file
from kstory.story.manifest import read_manifest
from kstory.story.build import StoryBuild
from kstory.story.review import FINAL_LORA, checkpoint_lora
from kstory.story.run import StoryResult, build_story, frame_work, spec_values
from kstory.story.spec_copy import SPEC_COPY
from kstory.story.spec import load_spec

log = get_logger("story")


def _verified(path: Path, sha256: str, what: str) -> Path:
    if not path.is_file() or sha256_file(path) != sha256:
        raise KstoryError(f"{what} changed or is missing since the story was generated", path=path,
                          fix="restore it, or generate the whole story again")
    return path


def _plan_from_record(out_dir: Path, index: int, record: dict[str, Any]) -> FramePlan:
    guides = []
    for g in record["guides"]:
        with Image.open(_verified(out_dir / g["file"], g["sha256"], "guide image")) as handle:
            image = handle.convert("RGB")
        guides.append(GuidePlan(kind=g["kind"], task=g["task"], controlnet=g["controlnet"], scale=g["scale"],
                                start=g["start"], end=g["end"], image=image, file=g["file"], source=g["source"],
                                notes=g["notes"]))
    return FramePlan(index=index, prompt=record["prompt"], frame_prompt=record["frame_prompt"],
                     negative_prompt=record["negative_prompt"], seed=record["seed"], width=record["width"],
                     height=record["height"], steps=record["steps"], cfg_scale=record["cfg_scale"], guides=guides)


def _lora_file(out_dir: Path, lora: dict[str, Any]) -> Path:
    """The LoRA the story was made with: at its recorded path, or in the run's lora/ folder after a move
    (``lora/checkpoints/<name>/`` when the manifest names the picked checkpoint)."""
    recorded = Path(lora["path"])
    lora_dir = Path(out_dir).resolve().parent / "lora"
    moved = checkpoint_lora(lora_dir, lora["checkpoint"]) if lora.get("checkpoint") else lora_dir / FINAL_LORA
    for candidate in (recorded, moved):
        if candidate.is_file() and sha256_file(candidate) == lora["sha256"]:
            return candidate
    return _verified(recorded, lora["sha256"], "LoRA")


def reroll(
    out_dir: Path,
    frame: int,
    *,
    seed: int | None = None,
    prompt: str | None = None,
    controlnets: Mapping[str, Path] | None = None,
    cache_dir: Path | None = None,
) -> StoryResult:
    """Generate frame ``frame`` (1-based) of the story in ``out_dir`` again.

    With neither ``seed`` nor ``prompt`` a fresh random seed is drawn; with
    only ``prompt`` the seed stays. Weights, LoRA and ControlNets are the
    ones the manifest records (checked by hash; ``controlnets`` may point at
    moved copies). The new frame is built in staging and swapped in with the
    rest of the story; the previous story goes to the run's ``.history/``, the
    manifest and ``story.yaml`` record the new seed and prompt. Returns the
    folder's state; ``generated`` is ``[frame]``.
    """
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise KstoryError(f"seed {seed} is out of range", fix=f"use a seed from 0 to {SEED_LIMIT - 1} (see docs/story.md)")
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise KstoryError("no manifest.json: this folder has no generated story", path=out_dir,
                          fix="run `kstory story` first")
    records = manifest["frames"]
    if str(frame) not in records:
        raise KstoryError(f"frame {frame} is not in this story (frames: {', '.join(records)})", path=out_dir,
                          fix="pick one of the listed frames")
    record = records[str(frame)]
    tried = {entry["seed"] for entry in record.get("seed_history", [])}
    if seed is None and prompt is None:
        seed = next(s for s in iter(lambda: secrets.randbelow(2**31), None) if s not in tried)
    spec_text = (out_dir / SPEC_COPY).read_text(encoding="utf-8")
    spec = load_spec(out_dir / SPEC_COPY)

    companions = [i for i in record.get("batch", [frame]) if str(i) in records]
    plans = [_plan_from_record(out_dir, i, records[str(i)]) for i in companions]
    target = next(plan for plan in plans if plan.index == frame)
    if seed is not None:
        target.seed = seed
    if prompt is not None:
        spec.frames[frame - 1].prompt = prompt
        target.frame_prompt = prompt
        target.prompt = spec.prompt(frame, manifest.get("trigger_word", ""))

    weights = resolve_model(manifest["model"]["spec"], cache_dir)
    if weights.fingerprint != manifest["model"]["fingerprint"]:
        raise KstoryError(f"the base model {manifest['model']['spec']!r} changed since the story was generated",
                          path=weights.root, fix="restore those weights, or generate the whole story again")
    lora = manifest["lora"]
    lora_path = _lora_file(out_dir, lora) if lora else None
    from kstory.core.lora_stack import check_loras, requests_from_records

    own_scale = (1.0 if lora["scale"] is None else lora["scale"]) if lora else None
    extra_loras = check_loras(requests_from_records(manifest.get("loras") or [], where=out_dir), weights,
                              own_scale=own_scale)
    paths = {name: Path(cn["path"]) for name, cn in manifest["controlnets"].items()}
    paths.update({name: Path(p) for name, p in (controlnets or {}).items()})
    needed = {guide.controlnet for plan in plans for guide in plan.guides}
    found = {name: identify(name, paths[name]) for name in sorted(needed)}
    for name, cn in found.items():
        if cn.sha256 != manifest["controlnets"][name]["sha256"]:
            raise KstoryError(f"ControlNet {name!r} is not the one the story was generated with", path=cn.path,
                              fix="point at the original weights (--controlnet NAME=PATH)")
    device = manifest["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise KstoryError("this story was generated on a GPU; re-rolling on the CPU would not match its frames",
                          path=out_dir, fix="re-roll on a machine with a GPU, or generate the whole story again")

    spec_value = {i: spec_values(records[str(i)]) for i in companions}
    origin = {frame: "reroll" if (target.seed, target.frame_prompt) != spec_value[frame] else "spec"}
    work = frame_work([plans], manifest["setup_id"], origin, spec_value)
    new = {**manifest, "frames": {}}
    build = StoryBuild(out_dir, manifest)
    build.open()
    for key, other in records.items():
        if int(key) != frame:
            build.take(out_dir, int(key), other, new)

    def load_session() -> Session:
        return Session.load(weights, lora=lora_path, lora_scale=lora["scale"] if lora else None, controlnets=found,
                            device=device, torch_dtype=getattr(torch, manifest["dtype"]), memory=recorded_memory(manifest),
                            loras=extra_loras)

    log.info("re-rolling frame %d with seed %d (batch %s)", frame, target.seed, companions)
    return build_story(build, new, [plans], {frame}, work, load_session=load_session, spec_text=spec_text,
                       release=spec.generation.release_text_encoder, device=device)
