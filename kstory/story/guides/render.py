"""Turn a spec guide into the image its ControlNet sees, at the frame's size."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.story.guides.canny import canny_edges
from kstory.story.guides.detect import detect_pose, estimate_depth
from kstory.story.guides.pose import pose_from_guide
from kstory.story.spec import CannyGuide, DepthGuide, ImageGuide, PoseGuide

log = get_logger("story")


@dataclass
class RenderedGuide:
    """A guide image plus what it was made from (for the manifest) and anything the user should know."""

    kind: str  # pose | canny | depth | image
    task: str | None  # pose | canny | depth: what the guide shows (picks the Union task)
    image: Image.Image
    source: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def _open(path: Path, base_dir: Path, width: int, height: int, notes: list[str], what: str) -> Image.Image:
    """Open a referenced image; one of the wrong size is resized, and the notes say so."""
    full = path if path.is_absolute() else base_dir / path
    try:
        with Image.open(full) as handle:
            image = handle.convert("RGB")
    except FileNotFoundError:
        raise KstoryError(f"{what} not found", path=full, fix="check the path (relative paths start at the spec's folder)") from None
    except (UnidentifiedImageError, OSError) as error:
        raise KstoryError(f"{what} is not a readable image ({error})", path=full, fix="use a PNG or JPEG file") from None
    if image.size != (width, height):
        note = f"{what} {full.name} is {image.width}x{image.height}, resized to the frame's {width}x{height}"
        notes.append(note)
        log.warning(note)
        image = image.resize((width, height), Image.BICUBIC)
    return image


def render_guide(guide: Any, width: int, height: int, base_dir: Path) -> RenderedGuide:
    """The guide image for ``guide`` (one of the spec's guide models) at ``width`` x ``height``."""
    notes: list[str] = []
    if isinstance(guide, PoseGuide):
        if guide.image is not None:
            reference = _open(guide.image, base_dir, width, height, notes, "pose reference")
            image = detect_pose(reference, guide.detector, base_dir / guide.image)
            return RenderedGuide("pose", "pose", image, {"image": str(guide.image), "detector": str(guide.detector)}, notes)
        source = {"pose": guide.pose, "flip": guide.flip} if guide.pose else {"keypoints": guide.keypoints.model_dump()}
        return RenderedGuide("pose", "pose", pose_from_guide(guide, width, height), source, notes)
    if isinstance(guide, CannyGuide):
        reference = _open(guide.image, base_dir, width, height, notes, "canny reference")
        source = {"image": str(guide.image), "low_threshold": guide.low_threshold, "high_threshold": guide.high_threshold}
        return RenderedGuide("canny", "canny", canny_edges(reference, guide.low_threshold, guide.high_threshold), source, notes)
    if isinstance(guide, DepthGuide):
        reference = _open(guide.image, base_dir, width, height, notes, "depth reference")
        image = estimate_depth(reference, guide.depth_model, base_dir / guide.image)
        return RenderedGuide("depth", "depth", image, {"image": str(guide.image), "depth_model": str(guide.depth_model)}, notes)
    assert isinstance(guide, ImageGuide)
    image = _open(guide.image, base_dir, width, height, notes, "guide image")
    task = guide.task or (guide.controlnet if guide.controlnet in ("pose", "canny", "depth") else None)
    return RenderedGuide("image", task, image, {"image": str(guide.image)}, notes)
