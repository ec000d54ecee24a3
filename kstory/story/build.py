"""One change to a story folder, built in staging and swapped in whole.

A full run, a ``--frames`` run and a re-roll all come down to the same
steps: decide each frame's plan, keep every frame whose inputs are unchanged
(from the story folder or from an interrupted run's staging folder), generate
the rest batch by batch into staging, then swap staging in (story.staging).

A frame's *key* hashes everything that decides its pixels: the setup (weights,
LoRA, ControlNets, sampler, device, dtype), its prompts, seed, size, steps,
CFG, guides (by the hash of the guide image) and the frames it shares a batch
with. Equal keys mean equal pixels, so a kept frame is exactly what
regenerating it would give.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kstory.core.hashing import sha256_file
from kstory.core.logs import get_logger
from kstory.core.rundir import STAMP_NAME
from kstory.story.generate import FramePlan
from kstory.story.manifest import read_manifest, write_manifest
from kstory.story.staging import commit, link_or_copy, set_aside, staging_dir

log = get_logger("story")
# Files of the story folder that the story stage does not write but that describe it: the stage's stamp and the
# dashboard's review choices (locked frames, order, picked checkpoint). A change built in staging keeps them.
CARRIED = (STAMP_NAME, "review.json")


# Where a file was found, recorded beside the hash that says what it is (a LoRA's or ControlNet's ``path``,
# the model's ``spec`` and ``identity`` beside its fingerprint): a moved or copied run finds its files
# elsewhere, and that alone changes no frame.
PLACE_KEYS = frozenset({"path", "spec", "identity"})


def without_places(value: Any) -> Any:
    """``value`` (a manifest or part of one) without the place keys of records that carry a content hash."""
    if isinstance(value, dict):
        hashed = "sha256" in value or "fingerprint" in value
        return {k: without_places(v) for k, v in value.items() if not (hashed and k in PLACE_KEYS)}
    if isinstance(value, list):
        return [without_places(item) for item in value]
    return value


def plan_key(plan: FramePlan, batch: list[int], setup: str, sampler: str, guide_hashes: list[str]) -> str:
    """Hash of everything that decides the frame's pixels (see the module docstring)."""
    data = {
        "setup": setup, "sampler": sampler, "prompt": plan.prompt, "negative_prompt": plan.negative_prompt,
        "seed": plan.seed, "size": [plan.width, plan.height], "steps": plan.steps, "cfg_scale": plan.cfg_scale,
        "batch": batch,
        "guides": [[g.kind, g.task, g.controlnet, g.scale, g.start, g.end, g.file, digest]
                   for g, digest in zip(plan.guides, guide_hashes)],
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _files_intact(folder: Path, record: dict[str, Any]) -> bool:
    """The frame and its guides are on disk with the hashes the record gives."""
    entries = [(record.get("file"), record.get("sha256"))]
    entries += [(g.get("file"), g.get("sha256")) for g in record.get("guides", [])]
    entries += [(r[name], r[digest]) for r in record.get("repairs", [])
                for name, digest in (("source_file", "source_sha256"), ("mask_file", "mask_sha256")) if r.get(name)]
    reference = _reference_file(record)
    if reference:
        entries.append((reference["file"], reference.get("sha256")))
    entries += [(part["file"], part.get("sha256")) for part in _face_files(record)]
    for name, digest in entries:
        if not name or not digest:
            return False
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            return False
    return True


def _reference_file(record: dict[str, Any]) -> dict[str, Any] | None:
    """The character reference image a frame was made with, when it is a file of the story folder."""
    reference = (record.get("ip_adapter") or {}).get("reference") or {}
    return reference if reference.get("file") else None


def _face_files(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The face embedding and crop a frame was made with (FaceID-Plus), files of the story folder."""
    face = record.get("face_id") or {}
    return [face[part] for part in ("embedding", "crop") if face.get(part)]


def _record_files(record: dict[str, Any]) -> list[str]:
    repairs = [name for r in record.get("repairs", []) for name in (r.get("source_file"), r.get("mask_file")) if name]
    reference = _reference_file(record)
    return [record["file"], *(g["file"] for g in record.get("guides", [])), *repairs,
            *([reference["file"]] if reference else []), *(part["file"] for part in _face_files(record))]


@dataclass
class StoryBuild:
    """The next state of the story folder ``out_dir``, assembled in its staging folder."""

    out_dir: Path
    current: dict[str, Any] | None  # the story folder's manifest (None: no story yet)
    staging: Path = field(init=False)
    staged: dict[str, Any] | None = field(init=False, default=None)  # an interrupted run's manifest
    _old_staging: Path | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.staging = staging_dir(self.out_dir)

    def open(self) -> None:
        """Start a fresh staging folder; an interrupted run's one is moved aside and read for reusable frames."""
        if self.staging.exists():
            try:
                self.staged = read_manifest(self.staging)
            except Exception:  # noqa: BLE001 - an unreadable leftover is simply not reused
                self.staged = None
            self._old_staging = set_aside(self.out_dir, self.staging)
            if self.staged is not None:
                log.info("found an interrupted story run (kept at %s); its finished frames are reused",
                         self._old_staging)
        self.staging.mkdir(parents=True)

    def reusable(self, index: int, key: str) -> tuple[Path, dict[str, Any]] | None:
        """A finished frame with this key, from the story folder or the interrupted run, files checked."""
        sources = [(self.out_dir, self.current), (self._old_staging, self.staged)]
        for folder, manifest in sources:
            if folder is None or manifest is None:
                continue
            record = manifest.get("frames", {}).get(str(index))
            if record and record.get("key") == key and _files_intact(folder, record):
                return folder, record
        return None

    def reusable_record(self, name: str, key: str) -> tuple[Path, dict[str, Any]] | None:
        """A top-level record of the manifest (the character sheet) with this key whose file is intact."""
        for folder, manifest in ((self.out_dir, self.current), (self._old_staging, self.staged)):
            record = (manifest or {}).get(name)
            if folder is not None and record and record.get("key") == key and _files_intact(folder, record):
                return folder, record
        return None

    def take(self, folder: Path, index: int, record: dict[str, Any], manifest: dict[str, Any]) -> None:
        """Put a finished frame (and its guides) into staging and the new manifest, unchanged."""
        for name in _record_files(record):
            link_or_copy(folder / name, self.staging / name)
        manifest["frames"][str(index)] = record

    def save(self, manifest: dict[str, Any]) -> None:
        manifest["frames"] = dict(sorted(manifest["frames"].items(), key=lambda item: int(item[0])))
        write_manifest(self.staging, manifest)

    def unchanged(self, manifest: dict[str, Any], spec_text: str, spec_copy: str) -> bool:
        """True when the new state equals the story folder's by content: same setup, frames and spec copy
        (files found at other places, as in a moved run, are the same files)."""
        if self.current is None:
            return False
        ignore = {"versions", "frames", "memory"}  # memory: how the frames were made (what changes pixels is in setup_id)
        same_top = without_places({k: v for k, v in manifest.items() if k not in ignore}) == \
            without_places({k: v for k, v in self.current.items() if k not in ignore})
        copy = self.out_dir / spec_copy
        same_copy = copy.is_file() and copy.read_text(encoding="utf-8") == spec_text
        return same_top and same_copy and without_places(manifest["frames"]) == without_places(self.current.get("frames"))

    def finish(self, manifest: dict[str, Any], write_extra: Callable[[Path], None]) -> Path | None:
        """Write the last files into staging and swap it in; returns where the previous story went."""
        self.save(manifest)
        write_extra(self.staging)
        for name in CARRIED:  # still the story `kstory run` made, still the choices the user made on it
            if (self.out_dir / name).is_file():
                link_or_copy(self.out_dir / name, self.staging / name)
        previous = commit(self.out_dir, self.staging)
        self._drop_old_staging(manifest)
        return previous

    def abandon(self, manifest: dict[str, Any]) -> None:
        """Nothing changed: remove the new staging folder (every frame in it is a link to a kept one)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self._drop_old_staging(manifest)

    def _drop_old_staging(self, manifest: dict[str, Any]) -> None:
        """The interrupted run's folder can go once every frame it finished is in the story (same key)."""
        if self._old_staging is None or self.staged is None:
            return
        final = manifest.get("frames", {})
        if all(final.get(k, {}).get("key") == r.get("key") for k, r in self.staged.get("frames", {}).items()):
            shutil.rmtree(self._old_staging, ignore_errors=True)
