"""The story spec: one YAML file describing every frame, validated with line-precise errors.

Defaults follow Kolors' recommendations (1024x1024, CFG 5, 25-50 steps);
``kstory.story.make_demo_spec`` writes a small one for the tiny model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kstory.core.errors import KstoryError
from kstory.core.seeds import Seed
from kstory.core.yamlio import load_yaml, validate
from kstory.story.consistent_spec import ConsistentAttention, check_consistent_attention
from kstory.story.face_spec import Face, check_face
from kstory.story.guides.pose_library import pose_names
from kstory.story.samplers import LEGACY, SAMPLERS

DEFAULT_FRAME_COUNT = 8


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Sheet(_Strict):
    """A generated character sheet: made first from its own prompt and seed, then the reference picture."""

    prompt: str = Field(min_length=1, description="What the sheet shows; the trigger word, description and style "
                                                  "come first, as in every frame's prompt.")
    seed: Seed = Field(description="Required, as a frame's: the sheet is reproducible only with a fixed seed.")
    negative_prompt: str | None = Field(default=None, description="Default: character.negative_prompt.")
    steps: int | None = Field(default=None, ge=1, le=200, description="Default: defaults.steps.")

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the character sheet's prompt is blank: say what the sheet shows")
        return value


class Reference(_Strict):
    """The character reference (Kolors IP-Adapter-Plus): an image file, the picture of one frame, or a generated
    character sheet."""

    image: Path | None = Field(default=None, description="Reference picture (relative to the spec file).")
    frame: int | None = Field(default=None, ge=1, description="This frame is made first and serves the others.")
    sheet: Sheet | None = Field(default=None, description="A character sheet made first (story size, sampler, "
                                                          "model and LoRA; no adapter, no guides).")
    adapter: str = Field(default="", description="Kolors-IP-Adapter-Plus folder (relative to the spec), or 'tiny'; "
                                                 "--ip-adapter overrides it.")
    frames: list[int] | None = Field(default=None, description="Frames that use it; default: all but the "
                                                                "reference frame.")
    scale: float = Field(default=0.5, ge=0.0, le=2.0, description="0.5: the official samples' value.")
    start: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of the steps where it starts.")
    end: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of the steps where it ends.")

    @model_validator(mode="after")
    def _one_source(self) -> Reference:
        given = [name for name in ("image", "frame", "sheet") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of image, frame, sheet (got {', '.join(given) or 'none'})")
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


class Character(_Strict):
    """What every frame shares: the LoRA trigger word, who the story is about, and what to avoid."""

    trigger_word: str = Field(default="", description="Put first in every prompt; empty: the LoRA's recorded trigger word.")
    description: str = Field(default="", description="Character description added to every frame's prompt.")
    style: str = Field(default="", description="Style words added to every frame's prompt.")
    negative_prompt: str = Field(default="", description="Negative prompt of every frame (a frame may override it).")
    reference: Reference | None = Field(default=None, description="A character reference for chosen frames.")
    face: Face | None = Field(default=None, description="A person's face for chosen frames (FaceID-Plus).")


class FrameSettings(_Strict):
    """Size and sampling settings; ``defaults`` sets them for all frames, a frame may override each."""

    width: int | None = Field(default=None, ge=64, le=4096, multiple_of=64)
    height: int | None = Field(default=None, ge=64, le=4096, multiple_of=64)
    steps: int | None = Field(default=None, ge=1, le=200)
    cfg_scale: float | None = Field(default=None, ge=1.0, le=30.0)
    sampler: Literal[SAMPLERS] | None = Field(default=None, description="euler (Kolors' default), euler_a, dpmpp_2m, "
                                              "dpmpp_2m_karras, dpmpp_2m_sde_karras, or ddim (left out: ddim).")


class Defaults(FrameSettings):
    width: int = Field(default=1024, ge=64, le=4096, multiple_of=64)
    height: int = Field(default=1024, ge=64, le=4096, multiple_of=64)
    steps: int = Field(default=30, ge=1, le=200, description="Kolors recommends 25-50.")
    cfg_scale: float = Field(default=5.0, ge=1.0, le=30.0, description="Kolors recommends about 5.")
    sampler: Literal[SAMPLERS] = Field(default=LEGACY, description="Left out: ddim, what stories made before the "
                                       "choice existed used; new specs say euler.")


class Generation(_Strict):
    """How frames are run; of this only ``batch_size`` and ``consistent_attention`` change a frame (docs/story.md)."""

    batch_size: int = Field(default=4, ge=1, le=64, description="Frames of one size denoised together.")
    release_text_encoder: Literal["auto", "always", "never"] = Field(
        default="auto", description="Move the text encoder off the GPU after encoding ('auto': when memory is short)."
    )
    consistent_attention: ConsistentAttention | None = Field(
        default=None, description="Frames attend to the identity frames' tokens (StoryDiffusion); none: off.")
    candidates: int = Field(
        default=1, ge=0, le=256,
        description="Seeds tried per frame by `kstory search` (best-of-N, docs/story.md); 1: the spec's seeds only.",
    )


class Person(_Strict):
    """One person in OpenPose JSON format: flat [x, y, confidence, ...] lists in pixels."""

    pose_keypoints_2d: list[float] = Field(min_length=54, max_length=54, description="COCO-18 body, 18 x (x, y, c).")
    hand_left_keypoints_2d: list[float] | None = Field(default=None, min_length=63, max_length=63)
    hand_right_keypoints_2d: list[float] | None = Field(default=None, min_length=63, max_length=63)
    face_keypoints_2d: list[float] | None = Field(default=None, min_length=210, max_length=210)


class Keypoints(_Strict):
    """OpenPose keypoints; coordinates are pixels of a ``canvas_width`` x ``canvas_height`` image (default: the frame)."""

    people: list[Person] = Field(min_length=1)
    canvas_width: int | None = Field(default=None, ge=1)
    canvas_height: int | None = Field(default=None, ge=1)


class ControlSettings(_Strict):
    controlnet: str | None = Field(default=None, description="Name of the ControlNet to use; default: the guide type.")
    scale: float = Field(default=1.0, ge=0.0, le=2.0)
    start: float = Field(default=0.0, ge=0.0, le=1.0, description="Fraction of the steps where guidance starts.")
    end: float = Field(default=1.0, ge=0.0, le=1.0, description="Fraction of the steps where guidance ends.")

    @model_validator(mode="after")
    def _window(self) -> ControlSettings:
        if self.start >= self.end:
            raise ValueError(f"start ({self.start}) must be below end ({self.end})")
        return self


class PoseGuide(ControlSettings):
    type: Literal["pose"]
    pose: str | None = Field(default=None, description="A built-in pose (see docs/story.md).")
    flip: bool = Field(default=False, description="Mirror a built-in pose left-right.")
    keypoints: Keypoints | None = None
    image: Path | None = Field(default=None, description="Reference photo for a local OpenPose detector.")
    detector: Path | None = Field(default=None, description="Folder with the OpenPose detector weights.")

    @model_validator(mode="after")
    def _one_source(self) -> PoseGuide:
        given = [name for name in ("pose", "keypoints", "image") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of pose, keypoints, image (got {given or 'none'})")
        if self.pose is not None and self.pose not in pose_names():
            raise ValueError(f"unknown pose {self.pose!r}; built-in poses: {', '.join(pose_names())}")
        return self


class CannyGuide(ControlSettings):
    type: Literal["canny"]
    image: Path
    low_threshold: int = Field(default=100, ge=0, le=1000)
    high_threshold: int = Field(default=200, ge=0, le=1000)

    @model_validator(mode="after")
    def _thresholds(self) -> CannyGuide:
        if self.low_threshold > self.high_threshold:
            raise ValueError("low_threshold must not exceed high_threshold")
        return self


class DepthGuide(ControlSettings):
    type: Literal["depth"]
    image: Path
    depth_model: Path | None = Field(default=None, description="Folder of a transformers depth-estimation model.")


class ImageGuide(ControlSettings):
    """A ready guide image (pose render, edge map, depth map) used as is."""

    type: Literal["image"]
    image: Path
    controlnet: str = Field(description="Name of the ControlNet this guide is for.")
    task: Literal["pose", "canny", "depth"] | None = Field(default=None, description="Union ControlNet task; default: the ControlNet name.")


Guide = Annotated[PoseGuide | CannyGuide | DepthGuide | ImageGuide, Field(discriminator="type")]


class Frame(FrameSettings):
    prompt: str = Field(min_length=1)
    seed: Seed = Field(description="Required: frames are reproducible only with a fixed seed (0 to 2**63-1).")
    negative_prompt: str | None = None
    guides: list[Guide] = Field(default_factory=list)
    reference_scale: float | None = Field(default=None, ge=0.0, le=2.0,
                                          description="This frame's character-reference scale (uses it when set).")


class ControlNetRef(_Strict):
    path: Path


class StorySpec(_Strict):
    DOC_PAGE: ClassVar[str] = "docs/story.md"

    title: str = Field(min_length=1)
    frame_count: int = Field(default=DEFAULT_FRAME_COUNT, ge=1, le=64)
    character: Character = Field(default_factory=Character)
    defaults: Defaults = Field(default_factory=Defaults)
    generation: Generation = Field(default_factory=Generation)
    controlnets: dict[str, ControlNetRef] = Field(default_factory=dict, description="Name -> weights; the CLI may add more.")
    frames: list[Frame]

    @model_validator(mode="after")
    def _count(self) -> StorySpec:
        if len(self.frames) != self.frame_count:
            raise ValueError(f"the story needs exactly {self.frame_count} frames, this spec has {len(self.frames)}")
        return self

    def settings(self, index: int) -> tuple[int, int, int, float]:
        """(width, height, steps, cfg_scale) of frame ``index`` (1-based), defaults filled in."""
        frame, base = self.frames[index - 1], self.defaults
        return (
            frame.width or base.width,
            frame.height or base.height,
            frame.steps or base.steps,
            frame.cfg_scale if frame.cfg_scale is not None else base.cfg_scale,
        )

    def sampler(self, index: int) -> str:
        """The sampler of frame ``index`` (1-based): its own, else the defaults'."""
        return self.frames[index - 1].sampler or self.defaults.sampler

    def prompt(self, index: int, trigger_word: str | None = None) -> str:
        """The full prompt of frame ``index``: trigger word, character, style, then the frame's own text."""
        return self.full_prompt(self.frames[index - 1].prompt, trigger_word)

    def full_prompt(self, text: str, trigger_word: str | None = None) -> str:
        """``text`` after the trigger word, the character's description and the style (a frame's or the sheet's)."""
        character = self.character
        parts = [trigger_word if trigger_word is not None else character.trigger_word, character.description,
                 character.style, text]
        return ", ".join(part.strip() for part in parts if part and part.strip())

    def negative_prompt(self, index: int) -> str:
        own = self.frames[index - 1].negative_prompt
        return own if own is not None else self.character.negative_prompt


def load_spec(path: Path, text: str | None = None) -> StorySpec:
    """Load and validate a story spec; every problem is reported with its line.

    ``text``: the spec as it would be written to ``path``, checked before it is (the dashboard's spec edits).
    """
    path = Path(path)
    data, marks = load_yaml(path, StorySpec.DOC_PAGE, text)
    spec = validate(StorySpec, data, marks, path)
    _check_keypoints(spec, marks, path)
    _check_reference(spec, marks, path)
    check_consistent_attention(spec, marks, path)
    check_face(spec, marks, path)
    return spec


def reference_frames(spec: StorySpec) -> dict[int, float]:
    """1-based frame -> scale, for every frame that uses the character reference."""
    ref = spec.character.reference
    if ref is None:
        return {}
    listed = ref.frames if ref.frames is not None else [i for i in range(1, spec.frame_count + 1) if i != ref.frame]
    used = {i: ref.scale for i in listed}
    for i, frame in enumerate(spec.frames, start=1):
        if frame.reference_scale is not None:
            used[i] = frame.reference_scale
    return dict(sorted(used.items()))


def _check_reference(spec: StorySpec, marks: dict[tuple, int], path: Path) -> None:
    """Frame numbers of the reference section must exist, and the reference frame cannot use itself."""
    ref = spec.character.reference
    if ref is None:
        return
    problems = []

    def where(*loc: object) -> str:
        line = marks.get(loc) or marks.get(loc[:-1]) or marks.get(("character", "reference"))
        return f"  line {line}: " if line else "  "

    count = spec.frame_count
    if ref.frame is not None and ref.frame > count:
        problems.append(f"{where('character', 'reference', 'frame')}character.reference.frame: no frame {ref.frame} "
                        f"(frames are 1..{count})")
    for k, index in enumerate(ref.frames or []):
        if not 1 <= index <= count:
            problems.append(f"{where('character', 'reference', 'frames', k)}character.reference.frames.{k}: no frame "
                            f"{index} (frames are 1..{count})")
    if ref.frame is not None and ref.frame in reference_frames(spec):
        own = spec.frames[ref.frame - 1].reference_scale is not None if ref.frame <= count else False
        loc = ("frames", ref.frame - 1, "reference_scale") if own else ("character", "reference", "frames")
        problems.append(f"{where(*loc)}frame {ref.frame} is the character reference and cannot use itself")
    if problems:
        raise KstoryError("invalid settings:\n" + "\n".join(problems), path=path,
                          fix="number frames 1..frame_count, and leave the reference frame out of the frames that use it")


def _check_keypoints(spec: StorySpec, marks: dict[tuple, int], path: Path) -> None:
    """Keypoints must lie on their canvas; pydantic cannot see the frame size, so this runs after."""
    problems = []
    for f, frame in enumerate(spec.frames):
        width, height, _, _ = spec.settings(f + 1)
        for g, guide in enumerate(frame.guides):
            if not isinstance(guide, PoseGuide) or guide.keypoints is None:
                continue
            canvas_w = guide.keypoints.canvas_width or width
            canvas_h = guide.keypoints.canvas_height or height
            for p, person in enumerate(guide.keypoints.people):
                for field in ("pose_keypoints_2d", "hand_left_keypoints_2d", "hand_right_keypoints_2d", "face_keypoints_2d"):
                    values = getattr(person, field) or []
                    for k in range(0, len(values), 3):
                        x, y, c = values[k : k + 3]
                        if c > 0 and not (0 <= x < canvas_w and 0 <= y < canvas_h):
                            loc = ("frames", f, "guides", g, "keypoints", "people", p, field)
                            line = marks.get(loc) or marks.get(loc[:5])
                            where = f"line {line}: " if line else ""
                            problems.append(
                                f"  {where}{'.'.join(map(str, loc))}: keypoint {k // 3} ({x:g}, {y:g}) is outside "
                                f"the {canvas_w}x{canvas_h} image"
                            )
    if problems:
        raise KstoryError(
            "invalid settings:\n" + "\n".join(problems), path=path,
            fix="keep keypoints inside the image, set confidence 0 for hidden points, or set canvas_width/canvas_height",
        )
