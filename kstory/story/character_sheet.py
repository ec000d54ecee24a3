"""The generated character sheet: made first from its own prompt and seed, then the character reference picture.

``character.reference.sheet`` is denoised alone (a batch of its own, so no
frame's pixels depend on it except through the reference) with the story's
model, LoRA and sampler at the story's size, without the adapter or guides,
and saved as ``character-sheet.png`` in the story folder. From then on it is a
reference image like ``image:``: its tokens are encoded, and each frame that
uses it records its file and hash, so a re-roll, a repair, a search or a
package reads it as a file. Its *key* hashes what decides its pixels, and the
frames that use it key on that key (as a ``frame: N`` reference keys on frame
N's), so a changed sheet remakes the sheet and its frames and nothing else.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from PIL import Image

from kstory.core.logs import get_logger
from kstory.story.build import plan_key
from kstory.story.generate import FramePlan
from kstory.story.manifest import png_bytes
from kstory.story.spec import StorySpec

if TYPE_CHECKING:
    from kstory.story.build import StoryBuild
    from kstory.story.generate import Session

log = get_logger("story")
SHEET_FILE = "character-sheet.png"  # in the story folder, beside frames/
RECORD = "character_sheet"  # the manifest's top-level entry
SHEET_INDEX = 0  # the sheet's plan number: not one of the story's frames (1..frame_count)


@dataclass
class CharacterSheet:
    """The sheet frames share: its plan and key (read back from a manifest, only the key)."""

    key: str = ""
    plan: FramePlan | None = None
    previous: dict[str, Any] | None = None  # the story folder's sheet record, whose history continues


def plan_sheet(spec: StorySpec, trigger_word: str) -> CharacterSheet | None:
    """The spec's character sheet as a plan of its own, or None when the spec has none."""
    ref = spec.character.reference
    if ref is None or ref.sheet is None:
        return None
    sheet, base = ref.sheet, spec.defaults
    negative = sheet.negative_prompt if sheet.negative_prompt is not None else spec.character.negative_prompt
    return CharacterSheet(plan=FramePlan(
        index=SHEET_INDEX, prompt=spec.full_prompt(sheet.prompt, trigger_word), frame_prompt=sheet.prompt,
        negative_prompt=negative, seed=sheet.seed, width=base.width, height=base.height,
        steps=sheet.steps or base.steps, cfg_scale=base.cfg_scale, sampler=base.sampler))


def sheet_key(plan: FramePlan, setup_id: str) -> str:
    """Hash of what decides the sheet's pixels: the story's setup and the sheet's prompts, seed, size and sampling."""
    data = {"character_sheet": plan_key(plan, [SHEET_INDEX], setup_id, plan.sampler, [])}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def sheet_of(plans: Iterable[Any]) -> CharacterSheet | None:
    """The character sheet the frames use, if any (one per story)."""
    return next((p.reference.sheet for p in plans if p.reference is not None and p.reference.sheet is not None
                 and p.reference.sheet.plan is not None), None)


def pending_sheet(plans: Iterable[Any], keep: set[int]) -> CharacterSheet | None:
    """The sheet that frames about to be made use and whose picture is not there yet."""
    return next((p.reference.sheet for p in plans if p.index in keep and p.reference is not None
                 and p.reference.sheet is not None and not p.reference.data), None)


def use_picture(plans: Iterable[Any], sheet: CharacterSheet, data: bytes) -> None:
    """Give every frame that uses ``sheet`` its picture (PNG bytes): from here on an image reference."""
    with Image.open(io.BytesIO(data)) as handle:
        image = handle.convert("RGB")
    digest = hashlib.sha256(data).hexdigest()
    for plan in plans:
        ref = plan.reference
        if ref is not None and ref.sheet is sheet:
            ref.data, ref.image, ref.sha256, ref.file = data, image, digest, SHEET_FILE


def sheet_record(sheet: CharacterSheet, sha256: str, seconds: float) -> dict[str, Any]:
    """The manifest's ``character_sheet``: what regenerates it, its hash, and the sheets made before it."""
    plan = sheet.plan
    assert plan is not None
    history = list((sheet.previous or {}).get("history", []))
    history.append({"seed": plan.seed, "prompt": plan.frame_prompt, "sha256": sha256,
                    "at": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return {"file": SHEET_FILE, "sha256": sha256, "prompt": plan.prompt, "sheet_prompt": plan.frame_prompt,
            "negative_prompt": plan.negative_prompt, "seed": plan.seed, "width": plan.width, "height": plan.height,
            "steps": plan.steps, "cfg_scale": plan.cfg_scale, "sampler": plan.sampler, "key": sheet.key,
            "seconds": round(seconds, 3), "history": history}


def reuse_sheet(build: StoryBuild, sheet: CharacterSheet, plans: list[Any], manifest: dict[str, Any]) -> bool:
    """Take an unchanged sheet (same key, file intact) from the story folder or an interrupted run; True if found.

    Otherwise the folder's record stays in ``manifest`` until the new sheet is made (a ``--frames`` run that
    makes no frame using it keeps the old one with the frames made from it).
    """
    found = build.reusable_record(RECORD, sheet.key)
    if found is not None:
        folder, record = found
        use_picture(plans, sheet, (folder / record["file"]).read_bytes())
        manifest[RECORD] = record
        return True
    sheet.previous = (build.current or {}).get(RECORD)
    if sheet.previous is not None:
        manifest[RECORD] = sheet.previous
    return False


def make_sheet(session: Session, sheet: CharacterSheet, plans: list[Any], manifest: dict[str, Any],
               release: str = "auto") -> None:
    """Denoise the sheet alone and hand its picture to the frames that use it (they write it with their inputs)."""
    assert sheet.plan is not None
    session.encode([sheet.plan], release)  # already encoded with the frames' prompts in a story run
    [(_, [image], seconds)] = list(session.generate([[sheet.plan]]))
    data = png_bytes(image)
    use_picture(plans, sheet, data)
    manifest[RECORD] = sheet_record(sheet, hashlib.sha256(data).hexdigest(), seconds)
    log.info("character sheet made in %.1f s (seed %d)", seconds, sheet.plan.seed)


def sheet_spec(record: dict[str, Any]) -> dict[str, Any]:
    """The spec's ``sheet:`` that makes the recorded sheet again (``kstory verify``)."""
    return {"prompt": record["sheet_prompt"], "seed": record["seed"], "negative_prompt": record["negative_prompt"],
            "steps": record["steps"]}
