"""The content of ``scores.json`` and the gate decision (documented in docs/scoring.md)."""

from __future__ import annotations

from pydantic import BaseModel, Field

SCHEMA = "kstory.scores/1"
WEAKEST_SHOWN = 3


class ModelInfo(BaseModel):
    """Which weights produced a number, so two reports can be compared."""

    role: str = Field(description="aesthetic, clip or dreamsim")
    form: str = Field(description="transformers (the challenge's folder), open_clip+mlp (LAION's form), open_clip, dreamsim")
    identity: str = Field(description="published id, open_clip NAME:PRETRAINED, or the local path")
    files: dict[str, str] = Field(default_factory=dict, description="weight file name -> sha256")
    quick_gelu: bool | None = Field(default=None, description="activation of the open_clip towers (OpenAI weights need it)")
    random_weights: bool = Field(default=False, description="a tiny test model: its scores mean nothing")


class ImageScore(BaseModel):
    file: str
    sha256: str
    width: int
    height: int
    mode: str = Field(description="PIL mode before conversion to RGB (L, P, RGBA ...)")
    aesthetic: float
    prompt: str | None = None
    clip_t: float | None = Field(default=None, description="cosine between the frame and its prompt")
    clip_i_to_others: float | None = Field(default=None, description="mean cosine to every other frame")
    dreamsim_to_others: float | None = Field(default=None, description="mean DreamSim distance to every other frame")


class SkippedFile(BaseModel):
    file: str
    reason: str


class WeakFrame(BaseModel):
    file: str
    aesthetic: float
    below_threshold_by: float = Field(description="threshold - score; negative when the frame is above it")


class Summary(BaseModel):
    count: int
    mean: float | None
    min: float | None
    max: float | None
    threshold: float
    gate: str = Field(description="pass, fail, or incomplete (scoring was interrupted; never a pass)")
    passed: bool
    missing_by: float | None = Field(description="how far the mean is below the threshold (0 when at or above it)")
    replace_weakest_needs: float | None = Field(
        description="score a replacement for the weakest frame needs for the mean to reach the threshold")
    weakest: list[WeakFrame]
    clip_t_mean: float | None = None
    clip_i_mean: float | None = Field(default=None, description="mean pairwise cosine between the frames")
    odd_one_out: str | None = Field(default=None, description="the frame least like the others (3 frames or more)")
    dreamsim_mean: float | None = None
    skipped: int
    models: dict[str, ModelInfo]


class IdentityScores(BaseModel):
    """How alike the frames are, as the consistency literature reports it (docs/scoring.md#identity)."""

    frames: int
    clip_i: float | None = Field(default=None, description="mean pairwise cosine of the frames' CLIP image embeddings")
    dreamsim: float | None = Field(default=None, description="mean pairwise DreamSim distance (lower: more alike)")
    clip_t: float | None = Field(default=None, description="mean cosine between a frame and its prompt")
    odd_one_out: str | None = Field(default=None, description="the frame with the lowest mean CLIP-I to the others (3+ frames)")
    odd_one_out_clip_i: float | None = None
    clip_i_to_others: dict[str, float] = Field(default_factory=dict, description="file -> mean CLIP-I to the other frames")


class Timing(BaseModel):
    load_s: float = Field(description="seconds to load the models")
    score_s: float = Field(description="seconds from the first decode to the last score")
    images_per_second: float | None = None


class ScoreReport(BaseModel):
    schema_id: str = Field(default=SCHEMA, alias="schema")
    complete: bool
    summary: Summary
    images: list[ImageScore]
    skipped: list[SkippedFile]
    warnings: list[str]
    identity: IdentityScores | None = Field(default=None, description="identity scores; null without a CLIP model")
    timing: Timing
    kstory_version: str

    model_config = {"populate_by_name": True}

    @property
    def passed(self) -> bool:
        return self.summary.passed

    @property
    def mean(self) -> float | None:
        return self.summary.mean

    def to_json(self) -> dict:
        """The report as written to ``scores.json``."""
        return self.model_dump(mode="json", by_alias=True)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def summarise(
    images: list[ImageScore], *, skipped: int, threshold: float, models: dict[str, ModelInfo], complete: bool = True
) -> Summary:
    """Decide the gate: pass when the mean aesthetic score is at least ``threshold``.

    The mean is over the scored images, in the organisers' way (a plain sum
    divided by the count); an empty set fails, as their loop returns 0, and
    an interrupted run is never a pass.
    """
    scores = [image.aesthetic for image in images]
    mean = sum(scores) / len(scores) if scores else None
    passed = complete and mean is not None and mean >= threshold
    ranked = sorted(images, key=lambda image: image.aesthetic)
    odd = None
    if len(images) >= 3 and images[0].clip_i_to_others is not None:
        odd = min(images, key=lambda image: image.clip_i_to_others)
    return Summary(
        count=len(images),
        mean=mean,
        min=min(scores, default=None),
        max=max(scores, default=None),
        threshold=threshold,
        gate="pass" if passed else "fail" if complete else "incomplete",
        passed=passed,
        missing_by=max(0.0, threshold - mean) if mean is not None else None,
        replace_weakest_needs=None if mean is None or mean >= threshold
        else ranked[0].aesthetic + len(scores) * (threshold - mean),
        weakest=[WeakFrame(file=i.file, aesthetic=i.aesthetic, below_threshold_by=threshold - i.aesthetic)
                 for i in ranked[:WEAKEST_SHOWN]],
        clip_t_mean=_mean([i.clip_t for i in images]),
        clip_i_mean=_mean([i.clip_i_to_others for i in images]),  # = mean of the off-diagonal cosines
        odd_one_out=odd.file if odd else None,
        dreamsim_mean=_mean([i.dreamsim_to_others for i in images]),
        skipped=skipped,
        models=models,
    )
