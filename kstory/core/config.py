"""The run configuration: one YAML file that drives ``kstory run``.

Each stage owns one section. Sections for stages that do not exist yet are
rejected rather than ignored, so a typo never silently does nothing. Relative
paths are taken relative to the config file, so a config can travel with its
data.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kstory.core.seeds import Seed
from kstory.core.yamlio import load_model
from kstory.core.train_settings import TrainSettings

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PrepSettings(Section):
    """Settings of the data-preparation stage (``kstory prep``)."""

    source: str = Field(description="Image-caption folder, or modelscope://OWNER/NAME for a ModelScope dataset.")
    recipe: Path | None = Field(default=None, description="Data-Juicer recipe YAML; the shipped default when empty.")
    trigger_word: str | None = Field(default=None, description="Word put at the front of every caption.")
    num_proc: int = Field(default=1, ge=1, description="Worker processes for Data-Juicer.")
    executor: Literal["default", "ray"] = Field(
        default="default", description="Data-Juicer executor: default (in this process) or ray (docs/scale-out.md).")
    ray_address: str = Field(default="local", description="With executor ray: local, auto or HOST:PORT of the cluster.")


class LoraSetting(Section):
    """One of the user's own LoRAs, stacked on the run's trained LoRA (docs/story.md, "Bringing LoRAs")."""

    path: Path = Field(description="The LoRA file: kohya/ComfyUI, diffusers/peft or DiffSynth keys; safetensors, or "
                       "a pickle that loads with weights_only.")
    scale: float = Field(default=1.0, description="Its strength: 1.0 applies it as its alpha/rank says.")
    source: str = Field(default="", description="Where it came from (a URL or hub id), recorded in the manifest "
                        "and the model card.")
    ship: bool = Field(default=False, description="Its licence lets you redistribute it: `kstory package` then "
                       "includes the file; otherwise the package records it by name, sha256 and source only.")


class StorySettings(Section):
    """Settings of the story stage (``kstory story``, docs/story.md)."""

    spec: Path = Field(description="Story spec YAML: the frames, prompts, seeds and guides.")
    lora_scale: float | None = Field(default=None, description="LoRA strength; default: as trained (1.0).")
    controlnets: dict[str, str] = Field(
        default_factory=dict,
        description="ControlNet name -> weights path, or 'tiny' for the offline random ControlNet of that name.",
    )
    loras: list[LoraSetting] = Field(default_factory=list, description="The user's own LoRAs, each with its scale, "
                                     "stacked in order on the run's trained LoRA.")


class RaySettings(Section):
    """Story generation on a Ray cluster (docs/scale-out.md); without this section stories run in this process."""

    address: str = Field(default="local", description="local (a private Ray instance on this machine), auto (the "
                         "cluster started here with `ray start --head`) or HOST:PORT of a head node.")
    workers: int | None = Field(default=None, ge=1, description="Story workers, each holding one loaded model: "
                                "default one per GPU of the cluster, or on the CPU one per cpus_per_worker CPUs.")
    cpus_per_worker: float = Field(default=1.0, gt=0, description="CPUs each worker reserves (CPU workers only).")


class ScoreSettings(Section):
    """Settings of the scoring stage (``kstory score``, docs/scoring.md)."""

    aesthetic_model: str | None = Field(
        default=None, description="kolors-challenge, a predictor folder or LAION .pth; default: tiny for the tiny model, else kolors-challenge."
    )
    clip_model: str | None = Field(default="auto", description="open_clip model for CLIP-T/CLIP-I; null skips them.")
    threshold: float = Field(default=6.0, description="Gate on the mean aesthetic score.")
    batch_size: int = Field(default=8, ge=1)

    def aesthetic_for(self, model: str) -> str:
        return self.aesthetic_model or ("tiny" if model == "tiny" else "kolors-challenge")


class PackageSettings(Section):
    """``kstory run`` builds and verifies the package when this section is there (docs/submissions.md)."""

    team: str = Field(description="Team name: the model is <team>-可图Kolors训练-<suffix>.")
    suffix: str = Field(description="Last part of the model name.")
    description: str | None = Field(default=None, description="Style description for the model card.")
    owner: str | None = Field(default=None, description="ModelScope owner, for the model card and the upload's model id.")
    verify: bool = Field(default=True, description="Regenerate every frame from the package and compare (kstory verify).")
    allow_failed_gate: bool = Field(default=False, description="Package although the score gate failed.")
    allow_test_model: bool = Field(default=False, description="Package a test artefact (tiny model or scorer), labelled.")


class UploadSettings(Section):
    """``kstory run`` uploads the package only when ``enabled`` or given ``--upload``: a run never publishes by surprise."""

    enabled: bool = Field(default=False, description="Upload on every `kstory run` (otherwise only with --upload).")
    model_id: str | None = Field(default=None, description="OWNER/<team>-可图Kolors训练-<suffix>; default: package.owner "
                                 "and the package's model name.")
    visibility: Literal["public", "private", "internal"] = Field(default="public",
                                                                  description="Visibility of a newly created model.")
    dry_run: bool = Field(default=False, description="List what would be sent, send nothing.")
    endpoint: str | None = Field(default=None, description="Hub endpoint; default: ModelScope's.")


class RunConfig(Section):
    """A whole run: where it lives, which base model, and each stage's settings."""

    DOC_PAGE: ClassVar[str] = "docs/config.md"
    SECTION_PAGES: ClassVar[dict[str, str]] = {"train": "docs/train.md"}

    name: str = Field(description="Run name; outputs go to RUNS_ROOT/NAME.")
    runs_root: Path = Field(default=Path("runs"), description="Folder that holds run directories.")
    model: str = Field(default="tiny", description="Base model: 'kolors', 'tiny', or a local folder.")
    cache_dir: Path | None = Field(default=None, description="Model cache; $KSTORY_CACHE or ~/.cache/kstory when empty.")
    seed: Seed = Field(default=0, description="Seed for everything random in the run (0 to 2**63-1).")
    memory: Literal["auto", "none", "24gb", "16gb", "12gb", "8gb", "cpu"] = Field(
        default="auto", description="Memory profile for train and story (docs/performance.md#memory-profiles); "
        "auto picks one from the free memory.")
    text_encoder_device: Literal["auto", "cpu"] = Field(
        default="auto", description="cpu: ChatGLM encodes on the CPU in train and story (auto: as the profile says).")
    text_encoder_quant: Literal["none", "int8", "int4"] = Field(
        default="none", description="int8 or int4: ChatGLM's linear weights as integers (torchao, kstory[quant]) "
        "in train and story; half the memory at int8, with a small embedding error (docs/performance.md).")
    prep: PrepSettings
    train: TrainSettings = Field(default_factory=TrainSettings, description="LoRA training (docs/train.md).")
    story: StorySettings | None = Field(default=None, description="Story generation; without it the run ends after train.")
    ray: RaySettings | None = Field(default=None, description="Generate the story's batches on a pool of Ray "
                                    "workers (docs/scale-out.md); the frames are the same as in one process.")
    score: ScoreSettings = Field(default_factory=ScoreSettings, description="Scoring of the story's frames.")
    package: PackageSettings | None = Field(default=None, description="Package and verify; without it the run ends "
                                            "after score.")
    upload: UploadSettings | None = Field(default=None, description="Upload the package (needs package:, and "
                                          "enabled: true or --upload).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if not RUN_NAME.match(value):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 64), starting with a letter or digit")
        return value

    @model_validator(mode="after")
    def _upload_needs_a_package(self) -> RunConfig:
        if self.upload is not None and self.package is None:
            raise ValueError("upload: needs a package: section (team, suffix) to upload")
        if self.upload is not None and not self.upload.model_id and not (self.package and self.package.owner):
            raise ValueError("upload: needs model_id (OWNER/NAME), or package.owner to name the model")
        return self

    @property
    def run_dir(self) -> Path:
        return self.runs_root / self.name

    def train_settings(self) -> TrainSettings:
        """Training settings with the run's seed and prep's trigger word where train sets none."""
        update = {}
        if "seed" not in self.train.model_fields_set:
            update["seed"] = self.seed
        if self.train.trigger_word is None and self.prep.trigger_word:
            update["trigger_word"] = self.prep.trigger_word
        # model_validate, not model_copy(update=...): a copy would skip the checks (a negative seed would train)
        return TrainSettings.model_validate({**self.train.model_dump(exclude_unset=True), **update})


def _anchor(path: Path | None, base: Path) -> Path | None:
    if path is None:
        return None
    path = Path(os.path.expanduser(path))
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _anchor_source(source: str, base: Path) -> str:
    if "://" in source or source.startswith("ms:"):
        return source
    return str(_anchor(Path(source), base))


def load_config(path: str | Path) -> RunConfig:
    """Read ``path``, validate it, and make its relative paths absolute.

    Without ``runs_root``, a config inside a folder named after the run (the
    README's ``runs/<name>/kstory.yaml``) runs in that folder, so a copied or
    moved run folder stays one run.
    """
    path = Path(path)
    config = load_model(RunConfig, path)
    base = path.resolve().parent
    data = config.model_dump(exclude_unset=True)  # unset stays unset: train_settings() relies on it
    runs_root = _anchor(config.runs_root, base)
    if "runs_root" not in config.model_fields_set and base.name == config.name:
        runs_root = base.parent  # runs/<name>/kstory.yaml: the config's folder is the run, wherever it is copied
    data.update(runs_root=runs_root, cache_dir=_anchor(config.cache_dir, base),
                model=config.model if config.model in ("kolors", "tiny") else str(_anchor(Path(config.model), base)))
    data["prep"].update(source=_anchor_source(config.prep.source, base), recipe=_anchor(config.prep.recipe, base))
    if config.story is not None:
        data["story"].update(spec=_anchor(config.story.spec, base), controlnets={
            name: value if value == "tiny" else str(_anchor(Path(value), base))
            for name, value in config.story.controlnets.items()})
        for lora in data["story"].get("loras", []):
            lora["path"] = _anchor(Path(lora["path"]), base)
    return RunConfig.model_validate(data)  # validated again, never a bare copy
