"""The spec's ``character.face`` section (Kolors IP-Adapter-FaceID-Plus) and the checks pydantic cannot do alone.

Kept apart from the adapter (``face_adapter``) so that reading a spec never
imports torch. A face is a photo (insightface finds the face in it), or the
512-d embedding and the face crop given directly, which needs no insightface.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kstory.core.errors import KstoryError

if TYPE_CHECKING:
    from kstory.story.spec import StorySpec


class Face(BaseModel):
    """A person's face for chosen frames (docs/story.md#a-face-kolors-ip-adapter-faceid-plus)."""

    model_config = ConfigDict(extra="forbid")

    image: Path | None = Field(default=None, description="A photo of the person; insightface antelopev2 finds the "
                                                         "largest face (relative to the spec file).")
    embedding: Path | None = Field(default=None, description="The 512-d antelopev2 embedding (numpy.save .npy).")
    crop: Path | None = Field(default=None, description="The face crop for CLIP (with embedding); resized to 336 px.")
    adapter: str = Field(default="", description="Kolors-IP-Adapter-FaceID-Plus folder (relative to the spec), or "
                                                 "'tiny'; --face-adapter overrides it.")
    frames: list[int] | None = Field(default=None, description="Frames that use the face; default: every frame.")
    scale: float = Field(default=0.8, ge=0.0, le=2.0, description="0.8: the official sample's value.")
    start: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of the steps where it starts.")
    end: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of the steps where it ends.")

    @model_validator(mode="after")
    def _one_source(self) -> Face:
        if self.image is not None and (self.embedding is not None or self.crop is not None):
            raise ValueError("give image, or embedding and crop, not both")
        if self.image is None and (self.embedding is None or self.crop is None):
            raise ValueError("give image (needs insightface), or both embedding and crop")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


def face_frames(spec: StorySpec) -> dict[int, float]:
    """1-based frame -> face scale, for every frame that uses the face."""
    face = spec.character.face
    if face is None:
        return {}
    listed = face.frames if face.frames is not None else range(1, spec.frame_count + 1)
    return {index: face.scale for index in sorted(listed)}


def check_face(spec: StorySpec, marks: dict[tuple, int], path: Path) -> None:
    """Frame numbers must exist; a story uses the face or the picture reference, not both (one adapter per frame)."""
    face = spec.character.face
    if face is None:
        return
    problems = []

    def where(*loc: object) -> str:
        line = marks.get(loc) or marks.get(("character", "face"))
        return f"  line {line}: " if line else "  "

    for k, index in enumerate(face.frames or []):
        if not 1 <= index <= spec.frame_count:
            problems.append(f"{where('character', 'face', 'frames', k)}character.face.frames.{k}: no frame {index} "
                            f"(frames are 1..{spec.frame_count})")
    if spec.character.reference is not None:
        problems.append(f"{where('character', 'face')}character.face and character.reference in one story: "
                        "kstory runs one adapter per story for now")
    if problems:
        raise KstoryError("invalid settings:\n" + "\n".join(problems), path=path,
                          fix="number frames 1..frame_count, and keep either character.face or character.reference")
