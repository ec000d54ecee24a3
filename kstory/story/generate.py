"""Generate story frames on DiffSynth's Kolors pipeline with the LoRA and per-frame ControlNet guides.

``Session`` owns the loaded networks: it encodes every prompt of a story once,
can move the text encoder off the GPU before denoising, and denoises frames
of one size and step count together (positive and negative prompt in one
batch) through DiffSynth's ``lets_dance_xl``, with each frame's own noise
from its own seed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffsynth.pipelines.dancer import lets_dance_xl
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.models import KolorsWeights
from kstory.story.controlnets import ControlNetWeights, ControlUnit, GuidedControl, load, union_task

log = get_logger("story")
SAMPLER = "ddim"  # DiffSynth's EnhancedDDIMScheduler with Kolors' beta schedule
_FREE_MEMORY_FOR_TEXT_ENCODER = 16 << 30  # below this much free GPU memory, 'auto' releases the text encoder
_OOM_FIX = (
    "lower generation.batch_size in the story spec (1 uses the least memory), set generation.release_text_encoder: "
    "always, use smaller frames (width/height), fewer ControlNets per frame, or a float16 dtype"
)


@dataclass
class GuidePlan:
    """One guide of one frame, ready to run: its image and its ControlNet settings."""

    kind: str
    task: str | None
    controlnet: str
    scale: float
    start: float
    end: float
    image: Image.Image
    file: str  # path relative to the story folder
    source: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class FramePlan:
    """Everything that decides one frame's pixels."""

    index: int
    prompt: str
    frame_prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    steps: int
    cfg_scale: float
    guides: list[GuidePlan] = field(default_factory=list)

    def group(self) -> tuple[int, int, int]:
        return (self.width, self.height, self.steps)


def batches(plans: list[FramePlan], batch_size: int) -> list[list[FramePlan]]:
    """Frames of one size and step count, in frame order, at most ``batch_size`` at a time.

    A frame's pixels depend (in the last bits) on how many frames share its
    batch, so batches are always formed from the whole story; re-rolls and
    partial runs re-run a frame's whole batch and keep only that frame.
    """
    groups: dict[tuple[int, int, int], list[FramePlan]] = {}
    for plan in plans:
        groups.setdefault(plan.group(), []).append(plan)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> torch.dtype:
    return torch.float16 if device.startswith("cuda") else torch.float32


class Session:
    """A Kolors pipeline with the LoRA merged and the story's ControlNets loaded."""

    def __init__(
        self, pipe: Any, controlnets: Mapping[str, tuple[ControlNetWeights, torch.nn.Module]],
        lora_info: dict[str, Any] | None = None,
    ):
        self.pipe, self.controlnets, self.lora_info = pipe, dict(controlnets), lora_info
        self.device, self.torch_dtype = pipe.device, pipe.torch_dtype
        self._embeddings: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}

    @classmethod
    def load(
        cls, weights: KolorsWeights, *, lora: Path | None, lora_scale: float | None,
        controlnets: Mapping[str, ControlNetWeights], device: str, torch_dtype: torch.dtype,
    ) -> Session:
        """Load the pipeline from ``weights``, merge the LoRA, load the named ControlNets."""
        from kstory.core.models import load_kolors_pipeline

        pipe = load_kolors_pipeline(weights, device=device, torch_dtype=torch_dtype)
        lora_info = None
        if lora is not None:
            from kstory.core.lora import load_lora_into_pipeline

            lora_info = load_lora_into_pipeline(pipe, lora, scale=lora_scale)
        loaded = {name: (cn, load(cn, device, torch_dtype)) for name, cn in controlnets.items()}
        return cls(pipe, loaded, lora_info)

    @torch.no_grad()
    def encode(self, plans: list[FramePlan], release: str = "auto") -> None:
        """Encode every distinct prompt once, then maybe move the text encoder to the CPU."""
        wanted = {(plan.prompt, True) for plan in plans} | {(plan.negative_prompt, False) for plan in plans}
        encoder, missing = self.pipe.text_encoder_kolors, sorted(wanted - set(self._embeddings))
        if missing:
            encoder.to(self.device)  # back from the CPU when a re-roll brings a new prompt
        for prompt, positive in missing:
            self._embeddings[(prompt, positive)] = self.pipe.encode_prompt(prompt, positive=positive)
        if self._should_release(release):
            encoder.to("cpu")
            torch.cuda.empty_cache()
            log.info("text encoder moved to the CPU for denoising (generation.release_text_encoder)")

    def _should_release(self, release: str) -> bool:
        if release == "never" or not str(self.device).startswith("cuda"):
            return False
        return release == "always" or torch.cuda.mem_get_info()[0] < _FREE_MEMORY_FOR_TEXT_ENCODER

    @torch.no_grad()
    def denoise(self, batch: list[FramePlan]) -> list[Image.Image]:
        """Generate one batch (same size and steps); returns one image per frame, in order."""
        pipe, first = self.pipe, batch[0]
        pipe.scheduler.set_timesteps(first.steps)
        shape = (1, 4, first.height // 8, first.width // 8)
        latents = torch.cat([pipe.generate_noise(shape, seed=plan.seed, device=self.device, dtype=self.torch_dtype)
                             for plan in batch])
        posi = [self._embeddings[(plan.prompt, True)] for plan in batch]
        nega = [self._embeddings[(plan.negative_prompt, False)] for plan in batch]
        prompt_emb = {key: torch.cat([e[key] for e in posi + nega]) for key in ("encoder_hidden_states", "add_text_embeds")}
        cfg = torch.tensor([plan.cfg_scale for plan in batch], device=self.device, dtype=self.torch_dtype).view(-1, 1, 1, 1)
        units = self._units(batch)
        size = 2 * len(batch)
        for step, timestep in enumerate(pipe.scheduler.timesteps):
            timestep = timestep.unsqueeze(0).to(self.device)
            model_input = torch.cat([latents, latents])
            extra = pipe.prepare_extra_input(model_input)
            control = GuidedControl(units, step, len(pipe.scheduler.timesteps), copies=2)
            noise = lets_dance_xl(
                pipe.unet, motion_modules=None, controlnet=control if control else None,
                sample=model_input, timestep=timestep, **extra, **prompt_emb,
                controlnet_frames=control.frames().to(self.device, self.torch_dtype) if control else None,
                unet_batch_size=size, controlnet_batch_size=size, device=self.device,
            )
            noise_posi, noise_nega = noise.chunk(2)
            latents = pipe.scheduler.step(noise_nega + cfg * (noise_posi - noise_nega), timestep, latents)
        # One frame at a time: the VAE at full size is the memory peak, and frames stay independent.
        return [pipe.decode_image(latents[i : i + 1]) for i in range(len(batch))]

    def _units(self, batch: list[FramePlan]) -> list[ControlUnit]:
        """One unit per (ControlNet, task) used in the batch; frames without such a guide get scale 0."""
        keys = []
        for plan in batch:
            for guide in plan.guides:
                if (guide.controlnet, guide.task) not in keys:
                    keys.append((guide.controlnet, guide.task))
        units = []
        for name, task in keys:
            weights, model = self.controlnets[name]
            images, scales, starts, ends = [], [], [], []
            for plan in batch:
                guide = next((g for g in plan.guides if (g.controlnet, g.task) == (name, task)), None)
                blank = Image.new("RGB", (plan.width, plan.height))
                images.append(_to_tensor(guide.image if guide else blank))
                scales.append(guide.scale if guide else 0.0)
                starts.append(guide.start if guide else 0.0)
                ends.append(guide.end if guide else 1.0)
            processor = union_task(task, name) if weights.kind == "union" else None
            units.append(ControlUnit(model, processor, torch.stack(images), scales, starts, ends))
        return units

    def generate(self, groups: list[list[FramePlan]]) -> Iterator[tuple[list[FramePlan], list[Image.Image], float]]:
        """Yield (batch, images, seconds) batch by batch; out-of-memory becomes a KstoryError naming the knobs."""
        for batch in groups:
            started = time.perf_counter()
            try:
                images = self.denoise(batch)
            except torch.cuda.OutOfMemoryError as error:
                raise KstoryError(_oom_message(batch, error), fix=_OOM_FIX) from error
            except RuntimeError as error:
                if "out of memory" not in str(error).lower() and "can't allocate memory" not in str(error).lower():
                    raise
                raise KstoryError(_oom_message(batch, error), fix=_OOM_FIX) from error
            yield batch, images, time.perf_counter() - started


def _oom_message(batch: list[FramePlan], error: Exception) -> str:
    frames = ", ".join(str(plan.index) for plan in batch)
    first = batch[0]
    return (f"ran out of memory generating frames {frames} ({first.width}x{first.height}, {first.steps} steps, "
            f"{len(batch)} frames per batch): {str(error).splitlines()[0]}")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """A guide as ControlNets expect it: (3, H, W) in [0, 1] (what DiffSynth's process_image makes)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
