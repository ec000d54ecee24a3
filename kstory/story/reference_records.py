"""The character reference between the spec, the frame plans and the manifest.

The spec's ``character.reference`` becomes a ``ReferencePlan`` on each frame
that uses it; the manifest records, per frame, the reference (its copy in the
story folder and sha256, the frame it is, or the character sheet's key, file
and sha256), the adapter's identity and hash, and the scale and window, so a
re-roll or ``kstory verify`` makes the same frames again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.story.character_sheet import SHEET_FILE, CharacterSheet, plan_sheet
from kstory.story.ip_adapter import IpAdapterWeights, identify_ip_adapter
from kstory.story.references import REFERENCE_DIR, ReferencePlan, load_reference_image
from kstory.story.spec import StorySpec, reference_frames

TINY = "tiny"


def reference_plans(spec: StorySpec, spec_dir: Path, trigger_word: str = "") -> dict[int, ReferencePlan]:
    """1-based frame -> its reference plan, for every frame that uses the character reference.

    Frames that use a character sheet share one ``CharacterSheet`` (its prompt gets ``trigger_word`` first).
    """
    ref = spec.character.reference
    used = reference_frames(spec)
    if ref is None or not used:
        return {}
    data, image, file, digest, source = b"", None, None, "", None
    if ref.image is not None:
        path = ref.image if ref.image.is_absolute() else spec_dir / ref.image
        data, image = load_reference_image(path)
        digest = hashlib.sha256(data).hexdigest()
        file = f"{REFERENCE_DIR}/character{path.suffix.lower() or '.png'}"
        source = ref.image.as_posix()
    sheet = plan_sheet(spec, trigger_word)
    if sheet is not None:
        file = SHEET_FILE
    return {index: ReferencePlan(scale, ref.start, ref.end, frame=ref.frame, image=image, file=file, sha256=digest,
                                 source=source, data=data, sheet=sheet)
            for index, scale in used.items()}


def adapter_record(adapter: IpAdapterWeights, tiny: bool) -> dict[str, Any]:
    """The manifest's top-level ``ip_adapter``."""
    return {**adapter.record(), "tiny": tiny}


def resolve_ip_adapter(spec: StorySpec, spec_dir: Path, given: str | Path | None,
                       cache_dir: Path | None) -> IpAdapterWeights | None:
    """The adapter the reference uses: ``given`` (the command line) over the spec's ``adapter``; ``tiny`` builds one."""
    ref = spec.character.reference
    if ref is None or not reference_frames(spec):
        return None
    choice = str(given) if given is not None else ref.adapter
    if not choice:
        raise KstoryError("the character reference needs the Kolors IP-Adapter-Plus, and none was given",
                          fix="set character.reference.adapter in the spec or pass --ip-adapter PATH "
                              "(the Kwai-Kolors/Kolors-IP-Adapter-Plus folder; 'tiny' for the offline test one)")
    if choice == TINY:
        from kstory.story.tiny_ip_adapter import build_tiny_ip_adapter

        return identify_ip_adapter(build_tiny_ip_adapter(cache_dir))
    path = Path(choice)
    return identify_ip_adapter(path if path.is_absolute() or given is not None else spec_dir / path)


def keyed(key: str, plan: Any, frame_keys: dict[int, str], adapter: IpAdapterWeights | None) -> str:
    """A frame's key with its reference folded in (frames without one keep the key they have without the adapter)."""
    if plan.reference is None:
        return key
    identity = plan.reference.identity(frame_keys, adapter.sha256 if adapter else "")
    return hashlib.sha256(json.dumps([key, identity], sort_keys=True).encode()).hexdigest()


def frame_entry(ref: ReferencePlan, adapter: IpAdapterWeights | None) -> dict[str, Any]:
    """The manifest's ``ip_adapter`` of one frame."""
    if ref.frame:
        what: dict[str, Any] = {"frame": ref.frame}
    elif ref.sheet is not None:
        what = {"sheet": ref.sheet.key, "file": ref.file}
    else:
        what = {"file": ref.file, "source": ref.source}
    what["sha256"] = ref.sha256
    return {"reference": what, "adapter": adapter.record() if adapter else None, "scale": ref.scale,
            "start": ref.start, "end": ref.end}


def plan_from_entry(entry: dict[str, Any], story_dir: Path) -> ReferencePlan:
    """A frame's reference plan again from its manifest entry (the reference image or character sheet from the story
    folder; a sheet keeps its key, so the frame's key is the one the story run gave it)."""
    what = entry["reference"]
    plan = ReferencePlan(entry["scale"], entry["start"], entry["end"], frame=what.get("frame"),
                         sheet=CharacterSheet(key=what["sheet"]) if what.get("sheet") else None)
    if not plan.frame:
        path = story_dir / what["file"]
        plan.data, plan.image = load_reference_image(path)
        plan.sha256, plan.file, plan.source = hashlib.sha256(plan.data).hexdigest(), what["file"], what.get("source")
        if plan.sha256 != what["sha256"]:
            raise KstoryError("the character reference changed since the story was generated", path=path,
                              fix="restore it, or generate the whole story again")
    return plan


def find_recorded_adapter(record: dict[str, Any] | None, given: str | Path | None,
                          cache_dir: Path | None) -> IpAdapterWeights | None:
    """The adapter a manifest names, found by hash: ``given``, the tiny one, or the recorded path."""
    if not record:
        return None
    candidates = [Path(given)] if given is not None and str(given) != TINY else []
    if record.get("tiny") or (given is not None and str(given) == TINY):
        from kstory.story.tiny_ip_adapter import build_tiny_ip_adapter

        candidates.append(build_tiny_ip_adapter(cache_dir))
    candidates.append(Path(record["path"]))
    for path in candidates:
        try:
            found = identify_ip_adapter(path)
        except KstoryError:
            continue
        if found.sha256 == record["sha256"]:
            return found
    raise KstoryError(f"the IP-Adapter the story used (sha256 {record['sha256'][:12]}) was not found",
                      path=record.get("path"), fix="pass --ip-adapter PATH with the adapter the story was made with")
