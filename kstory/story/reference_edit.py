"""Change a story spec's character reference or consistent attention and save it: checked by the spec model
first, the old spec kept.

The dashboard's Character page chooses the reference (an image file, a frame of
the story), which frames use it and at what scale; this turns the choice into
the spec's ``character.reference`` (and the frames' ``reference_scale``) and
writes the spec, so the page holds no spec logic and the story stage reads
exactly what the page showed. PyYAML keeps no comments, so only the spec's
leading comment lines survive a save; the previous spec is copied to the run's
``.history/`` first, so nothing is lost.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kstory.core import atomic
from kstory.core.errors import KstoryError
from kstory.core.rundir import RunDir, copy_to_history
from kstory.story.references import load_reference_image
from kstory.story.spec import Reference, StorySpec, load_spec

# The reference's source fields: a spec sets exactly one. A new kind of source is one more name here (and one
# more option on the page); every other field of the reference is a setting kept as the spec has it.
SOURCE_KEYS: tuple[str, ...] = ("image", "frame", "sheet")
SETTING_KEYS: tuple[str, ...] = ("adapter", "frames", "scale", "start", "end")
DEFAULT_SCALE: float = Reference.model_fields["scale"].default


@dataclass(frozen=True)
class ReferenceChoice:
    """What the page chose: the source, the frames that use it (with their own scale, or None), the story-wide scale."""

    source: dict[str, Any]  # one of SOURCE_KEYS -> its value: {"image": "../references/fox.png"} or {"frame": 1}
    frames: dict[int, float | None] = field(default_factory=dict)
    scale: float = DEFAULT_SCALE

    def __post_init__(self) -> None:
        if len(self.source) != 1 or next(iter(self.source)) not in SOURCE_KEYS:
            raise ValueError(f"a reference has exactly one source of {', '.join(SOURCE_KEYS)}, got {self.source}")


@dataclass(frozen=True)
class SavedSpec:
    """The outcome of a save: whether the spec changed, and where its previous version was kept."""

    path: Path
    changed: bool
    kept: Path | None = None


def spec_relative(path: Path, spec_dir: Path) -> str:
    """``path`` as a spec writes it: relative to the spec's folder, with forward slashes."""
    return Path(os.path.relpath(Path(path).resolve(), Path(spec_dir).resolve())).as_posix()


def _round(value: float) -> float:
    return round(float(value), 4)  # 0.1 + 0.2 from a widget's steps is written as 0.3


def apply_choice(data: dict[str, Any], choice: ReferenceChoice) -> dict[str, Any]:
    """A copy of the spec's data with ``character.reference`` and the frames' ``reference_scale`` set to ``choice``.

    The adapter, the window and any other setting of the old reference stay. ``frames:`` is written when the spec
    had it or the frames differ from the default (every frame but the reference frame); ``scale:`` when the spec
    had it or it is not the default.
    """
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    character = data.get("character") if isinstance(data.get("character"), dict) else {}
    old = character.get("reference") if isinstance(character.get("reference"), dict) else {}
    count = int(data.get("frame_count", len(data.get("frames") or [])))
    used = sorted(choice.frames)
    reference: dict[str, Any] = dict(choice.source)
    if "adapter" in old:
        reference["adapter"] = old["adapter"]
    default = [i for i in range(1, count + 1) if i != choice.source.get("frame")]
    if "frames" in old or used != default:
        reference["frames"] = used
    if "scale" in old or _round(choice.scale) != DEFAULT_SCALE:
        reference["scale"] = _round(choice.scale)
    reference.update((key, value) for key, value in old.items() if key not in SOURCE_KEYS and key not in reference)
    character["reference"] = reference
    data["character"] = character
    for index, frame in enumerate(data.get("frames") or [], start=1):
        if not isinstance(frame, dict):
            continue
        own = choice.frames.get(index)
        if own is not None:
            frame["reference_scale"] = _round(own)
        else:
            frame.pop("reference_scale", None)
    return data


def render_spec(original: str, data: dict[str, Any]) -> str:
    """The spec's text for ``data``, under the original's leading comment lines."""
    header = []
    for line in original.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        header.append(line if line.endswith("\n") else line + "\n")
    return "".join(header) + yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


def check_reference_image(spec: StorySpec, spec_path: Path) -> None:
    """The reference image the spec names must be a readable picture (named otherwise, as the story stage does)."""
    ref = spec.character.reference
    if ref is not None and ref.image is not None:
        load_reference_image(ref.image if ref.image.is_absolute() else Path(spec_path).parent / ref.image)


@dataclass(frozen=True)
class SharingChoice:
    """Consistent attention as the page set it: off, or on with the frames that write and read the bank."""

    enabled: bool
    identity_frames: list[int] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # the frames that share (identity frames included)


def apply_sharing(data: dict[str, Any], choice: SharingChoice) -> dict[str, Any]:
    """A copy of the spec's data with ``generation.consistent_attention`` set to ``choice``.

    Off removes the section; on keeps its other settings (share, layers, steps) and writes the frame lists.
    """
    data = copy.deepcopy(data) if isinstance(data, dict) else {}
    generation = data.get("generation") if isinstance(data.get("generation"), dict) else {}
    if not choice.enabled:
        generation.pop("consistent_attention", None)
    else:
        old = generation.get("consistent_attention")
        section = dict(old) if isinstance(old, dict) else {}
        section["identity_frames"] = sorted(choice.identity_frames)
        section["frames"] = sorted(set(choice.frames) | set(choice.identity_frames))
        generation["consistent_attention"] = section
    if generation:
        data["generation"] = generation
    else:
        data.pop("generation", None)
    return data


def save_sharing(spec_path: Path, choice: SharingChoice, run: RunDir) -> SavedSpec:
    """Write ``choice`` into the spec, checked and kept as :func:`save_reference` does."""
    return _save(spec_path, run, lambda data: apply_sharing(data, choice))


def save_reference(spec_path: Path, choice: ReferenceChoice, run: RunDir) -> SavedSpec:
    """Write ``choice`` into the spec at ``spec_path``, keeping the previous spec in ``run``'s ``.history/``.

    The new text is validated by the real spec model (``load_spec``) and its reference image read before
    anything is written; a bad choice raises the spec's own KstoryError and leaves the file as it was.
    """
    return _save(spec_path, run, lambda data: apply_choice(data, choice))


def _save(spec_path: Path, run: RunDir, change: Any) -> SavedSpec:
    spec_path = Path(spec_path)
    try:
        original = spec_path.read_text(encoding="utf-8")
    except OSError as error:
        raise KstoryError(f"the story spec cannot be read ({error.strerror or error})", path=spec_path,
                          fix="check story.spec in the run's kstory.yaml") from error
    text = render_spec(original, change(yaml.safe_load(original) or {}))
    try:
        spec = load_spec(spec_path, text)
    except KstoryError as error:
        raise KstoryError("the changed spec was not saved (its line numbers are those of the changed spec): "
                          + error.message, path=spec_path, fix=error.fix) from None
    check_reference_image(spec, spec_path)
    if text == original:
        return SavedSpec(spec_path, changed=False)
    kept = copy_to_history(run, spec_path)
    atomic.write_text(spec_path, text)
    return SavedSpec(spec_path, changed=True, kept=kept)
