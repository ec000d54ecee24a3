"""The spec's ``generation.consistent_attention`` section and the checks pydantic cannot do alone.

Kept apart from the attention hook (``consistent_attention``) so that reading a
spec never imports torch. Defaults follow StoryDiffusion: half of each other
identity frame's tokens, the UNet's up blocks, off at the first step.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kstory.core.errors import KstoryError

if TYPE_CHECKING:
    from kstory.story.spec import StorySpec

LAYER_NAMES = ("up", "up.0", "up.1", "mid", "down", "down.0", "down.1")
DEFAULT_IDENTITY_FRAMES = 4  # StoryDiffusion's id_length: the first four frames feed the bank
LayerName = Literal["up", "up.0", "up.1", "mid", "down", "down.0", "down.1"]


class ConsistentAttention(BaseModel):
    """Training-free shared self-attention across frames (docs/story.md#consistent-attention)."""

    model_config = ConfigDict(extra="forbid")

    share: float = Field(default=0.5, ge=0.0, le=1.0,
                         description="Fraction of each identity frame's tokens added to another frame's self-attention.")
    layers: list[LayerName] = Field(default_factory=lambda: ["up"], min_length=1,
                                    description="UNet self-attention layers that share: up, up.0, up.1, mid, down, down.0, down.1.")
    start_step: int = Field(default=1, ge=0, le=200, description="First denoising step that shares (0-based).")
    end_step: int | None = Field(default=None, ge=1, le=200, description="Sharing stops before this step; none: the last.")
    identity_frames: list[int] | None = Field(
        default=None, min_length=1,
        description="Frames that write the bank (generated first); default: the first four.")
    frames: list[int] | None = Field(default=None, description="Frames that read the bank; default: every frame.")

    @model_validator(mode="after")
    def _window(self) -> ConsistentAttention:
        if self.end_step is not None and self.end_step <= self.start_step:
            raise ValueError(f"end_step ({self.end_step}) must be above start_step ({self.start_step})")
        return self


def check_consistent_attention(spec: StorySpec, marks: dict[tuple, int], path: Path) -> None:
    """Frame numbers in range, and every sharing frame with the identity frames' step count (the bank is per step)."""
    section = spec.generation.consistent_attention
    if section is None:
        return
    problems = []
    base = ("generation", "consistent_attention")
    for field in ("identity_frames", "frames"):
        for position, number in enumerate(getattr(section, field) or []):
            if not 1 <= number <= spec.frame_count:
                line = marks.get((*base, field, position)) or marks.get((*base, field))
                where = f"line {line}: " if line else ""
                problems.append(f"  {where}{'.'.join((*base, field))}: no frame {number} "
                                f"(frames are numbered 1..{spec.frame_count})")
    if not problems:
        identity, readers = sharing_frames(spec)
        steps = {spec.settings(i)[2] for i in identity | readers}
        if len(steps) > 1:
            line = marks.get(base)
            where = f"line {line}: " if line else ""
            problems.append(f"  {where}{'.'.join(base)}: the frames that share attention have different step counts "
                            f"({', '.join(map(str, sorted(steps)))}); the bank is kept per step")
        elif steps and section.start_step >= steps.pop():
            line = marks.get((*base, "start_step")) or marks.get(base)
            where = f"line {line}: " if line else ""
            problems.append(f"  {where}{'.'.join(base)}.start_step: {section.start_step} is not below the frames' "
                            "step count, so no step would share attention")
    if problems:
        raise KstoryError("invalid settings:\n" + "\n".join(problems), path=path,
                          fix="number frames from 1, give sharing frames one step count, and start sharing "
                              "before the last step (see docs/story.md#consistent-attention)")


def sharing_frames(spec: StorySpec) -> tuple[set[int], set[int]]:
    """(identity frames, reader frames) of a spec; both empty when consistent attention is off."""
    section = spec.generation.consistent_attention
    if section is None:
        return set(), set()
    all_frames = set(range(1, spec.frame_count + 1))
    identity = set(section.identity_frames or range(1, min(DEFAULT_IDENTITY_FRAMES, spec.frame_count) + 1))
    users = set(section.frames) if section.frames is not None else all_frames
    return identity, (users - identity) & all_frames
