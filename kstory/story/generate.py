"""Generate story frames on DiffSynth's Kolors pipeline with the LoRA and per-frame ControlNet guides.

``Session`` owns the networks, one phase at a time: it encodes every prompt
of a story once, frees the text encoder before the UNet loads, and denoises frames
of one size and step count together (positive and negative prompt in one
batch) through DiffSynth's ``lets_dance_xl``, with each frame's own noise
from its own seed.
"""

from __future__ import annotations

import contextlib
import io
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffsynth.pipelines.dancer import lets_dance_xl
from PIL import Image

from kstory.core.logs import get_logger
from kstory.core.memory import PER_BATCH_CONTROLNET_PROFILES, MemoryPlan, free_models
from kstory.core.models import KolorsWeights
from kstory.core.out_of_memory import out_of_memory_named
from kstory.story.consistent_attention import AttentionBank, shared_attention
from kstory.story.controlnets import ControlNetWeights, ControlUnit, GuidedControl, load, union_task
from kstory.story.ip_adapter import IpAdapterWeights
from kstory.story.face_references import FaceReferences
from kstory.story.references import ReferencePlan, References
from kstory.story.samplers import LEGACY, make_sampler

log = get_logger("story")
SAMPLER = LEGACY  # a spec without `sampler`: DiffSynth's EnhancedDDIMScheduler with Kolors' beta schedule
_VAE_TILE = 64  # DiffSynth's default tile_size for the SDXL VAE decoder, in latent pixels
_FREE_MEMORY_FOR_TEXT_ENCODER = 16 << 30  # below this much free GPU memory, 'auto' releases the text encoder
_OOM_FIX = (
    "use a smaller memory profile (--memory 12gb, 8gb or cpu), lower generation.batch_size in the story spec "
    "(1 uses the least memory), set generation.release_text_encoder: always, use smaller frames (width/height), "
    "fewer ControlNets per frame, or a float16 dtype"
)


@dataclass
class StartLatents:
    """Where a repair starts: the source picture's latents, the strength, and for inpainting the latents kept.

    ``keep`` is 1 where the source stays (outside the mask) and 0 where the frame is repainted, at latent size.
    With an inpainting UNet (``unet``, 9 input channels), ``condition`` (the mask and the masked picture's
    latents) follows the scaled latents into it at every step, as diffusers' inpainting pipelines do.
    """

    source: torch.Tensor
    strength: float
    keep: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    unet: torch.nn.Module | None = None


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
    sampler: str = SAMPLER
    repairs: list[Any] = field(default_factory=list)  # kstory.story.repair.Repair, applied in order after generation
    reference: ReferencePlan | None = None  # the character reference (IP-Adapter), when the frame uses one
    face: Any = None  # kstory.story.face_references.FacePlan: the face (FaceID-Plus), when the frame uses one

    def group(self) -> tuple[int, int, int, str]:
        return (self.width, self.height, self.steps, self.sampler)


def batches(plans: list[FramePlan], batch_size: int) -> list[list[FramePlan]]:
    """Frames of one size, step count and sampler, in frame order, at most ``batch_size`` at a time.

    A frame's pixels depend (in the last bits) on how many frames share its
    batch, so batches are always formed from the whole story; re-rolls and
    partial runs re-run a frame's whole batch and keep only that frame.
    """
    groups: dict[tuple[int, int, int, str], list[FramePlan]] = {}
    for plan in plans:
        groups.setdefault(plan.group(), []).append(plan)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str, memory: MemoryPlan | None = None) -> torch.dtype:
    """fp16 on a GPU; on the CPU float32, or bf16 when the memory profile asks for half precision."""
    if device.startswith("cuda"):
        return torch.float16
    return torch.bfloat16 if memory is not None and memory.half else torch.float32


def recorded_memory(manifest: Mapping[str, Any]) -> MemoryPlan | None:
    """The memory profile a story was made with (its tiled decoding and text-encoder device change pixels)."""
    record = manifest.get("memory")
    if not record:
        return None
    known = MemoryPlan.__dataclass_fields__
    return MemoryPlan(**{k: v for k, v in record.items() if k in known})


def text_encoder_dtype(device: str, dtype: torch.dtype) -> torch.dtype:
    """ChatGLM's dtype when it encodes on another device: the story's, but bf16 instead of fp16 on a CPU."""
    return torch.bfloat16 if str(device).startswith("cpu") and dtype == torch.float16 else dtype


class Session:
    """Kolors for a story, one phase at a time.

    ChatGLM loads, encodes every prompt of the frames to be made and is freed
    (unless the memory profile keeps it) before the UNet, the ControlNets and
    the merged LoRA load; the VAE decoder then decodes. The peak is the larger
    phase, not the sum. A prompt that is new later (a re-roll) loads ChatGLM again.
    """

    def __init__(
        self, weights: KolorsWeights, *, lora: Path | None, lora_scale: float | None,
        controlnets: Mapping[str, ControlNetWeights], device: str, torch_dtype: torch.dtype,
        memory: MemoryPlan | None = None, ip_adapter: IpAdapterWeights | None = None, loras: Sequence[Any] = (),
        face_adapter: Any = None,
    ):
        self.weights, self.lora, self.lora_scale = weights, lora, lora_scale
        self.loras = list(loras)  # the user's own LoRAs (kstory.core.lora_stack.PlannedLora), stacked on ``lora``
        self.references = References(ip_adapter, device, torch_dtype)
        self.faces = FaceReferences(face_adapter, device, torch_dtype)
        self.controlnet_weights = dict(controlnets)
        self.device, self.torch_dtype, self.memory = device, torch_dtype, memory
        self.tiled_vae = bool(memory and memory.tiled_vae)
        self.keep_text_encoder = bool(memory and memory.keep_text_encoder)
        self.text_device = "cpu" if memory and memory.text_encoder_device == "cpu" else device
        moved = torch.device(self.text_device).type != torch.device(device).type
        self.text_dtype = text_encoder_dtype(self.text_device, torch_dtype) if moved else torch_dtype
        self.controlnets: dict[str, tuple[ControlNetWeights, torch.nn.Module]] = {}
        self.lora_info: dict[str, Any] | None = None
        self._embeddings: dict[tuple[str, bool], dict[str, torch.Tensor]] = {}
        self._text: tuple[Any, Any] | None = None  # (ModelManager, KolorsPrompter) while ChatGLM is loaded
        self._pipe: Any = None

    @classmethod
    def load(
        cls, weights: KolorsWeights, *, lora: Path | None, lora_scale: float | None,
        controlnets: Mapping[str, ControlNetWeights], device: str, torch_dtype: torch.dtype,
        memory: MemoryPlan | None = None, ip_adapter: IpAdapterWeights | None = None, loras: Sequence[Any] = (),
        face_adapter: Any = None,
    ) -> Session:
        """A session on ``weights`` with the LoRA, the named ControlNets and the IP-Adapter; each network loads in
        its phase."""
        return cls(weights, lora=lora, lora_scale=lora_scale, controlnets=controlnets, device=device,
                   torch_dtype=torch_dtype, memory=memory, ip_adapter=ip_adapter, loras=loras, face_adapter=face_adapter)

    def _prompter(self) -> Any:
        if self._text is None:
            from diffsynth.prompters import KolorsPrompter

            from kstory.core.models import load_kolors_model_manager

            from kstory.core.models.quantize import quantize_text_encoder

            quant = self.memory.text_encoder_quant if self.memory else "none"
            log.info("loading the text encoder (%s on the %s%s)", str(self.text_dtype).removeprefix("torch."),
                     self.text_device, "" if quant == "none" else f", {quant} weights")
            # Integer weights are made on the CPU from the half-precision ones, then moved.
            manager = load_kolors_model_manager(self.weights, device="cpu" if quant != "none" else self.text_device,
                                                torch_dtype=self.text_dtype, parts=("text_encoder",))
            prompter = KolorsPrompter()
            with contextlib.redirect_stdout(io.StringIO()):
                prompter.fetch_models(manager.fetch_model("kolors_text_encoder"))
            quantize_text_encoder(prompter.text_encoder, quant)
            self._text = (manager, prompter)
        manager, prompter = self._text
        prompter.text_encoder.to(self.text_device)  # back from the CPU when a re-roll brings a new prompt
        return prompter

    def free_text_encoder(self) -> None:
        """Drop ChatGLM entirely (storage released), so the next phase has its memory."""
        if self._text is None:
            return
        manager, prompter = self._text
        self._text = None
        models = list(manager.model)
        manager.model.clear()
        prompter.text_encoder = None
        del manager, prompter
        free_models(*models)
        log.info("text encoder freed before denoising (memory profile %s)",
                 self.memory.profile if self.memory else "none")

    @torch.no_grad()
    def encode(self, plans: list[FramePlan], release: str = "auto") -> None:
        """Encode every distinct prompt once; then free ChatGLM (or, when the profile keeps it, maybe park it on the CPU)."""
        wanted = {(plan.prompt, True) for plan in plans} | {(plan.negative_prompt, False) for plan in plans}
        missing = sorted(wanted - set(self._embeddings))
        if missing and self.memory is not None and self.memory.text_encoder_streamed:
            self._encode_streamed(missing)
        elif missing:
            prompter = self._prompter()
            for prompt, positive in missing:
                pooled, prompt_emb = prompter.encode_prompt(prompt, clip_skip=1, clip_skip_2=2,
                                                            device=self.text_device, positive=positive)
                self._embeddings[(prompt, positive)] = {
                    "encoder_hidden_states": prompt_emb.to(self.device, self.torch_dtype),
                    "add_text_embeds": pooled.to(self.device, self.torch_dtype),
                }
        if not self.keep_text_encoder:
            self.free_text_encoder()
        elif self._text is not None and self._should_release(release):
            self._text[1].text_encoder.to("cpu")
            torch.cuda.empty_cache()
            log.info("text encoder moved to the CPU for denoising (generation.release_text_encoder)")

    def _encode_streamed(self, missing: list[tuple[str, bool]]) -> None:
        """The memory profile's way: ChatGLM one block at a time, every prompt through each (same numbers)."""
        from kstory.core.models.streamed_text_encoder import StreamedChatGLM

        quant = self.memory.text_encoder_quant if self.memory else "none"
        log.info("encoding %d prompt(s) with the text encoder one block at a time (%s on the %s)", len(missing),
                 str(self.text_dtype).removeprefix("torch."), self.text_device)
        encoder = StreamedChatGLM(self.weights.text_encoder, device=self.text_device, dtype=self.text_dtype,
                                  quant=quant)
        for (prompt, positive), (pooled, prompt_emb) in zip(missing, encoder.encode(missing)):
            self._embeddings[(prompt, positive)] = {
                "encoder_hidden_states": prompt_emb.to(self.device, self.torch_dtype),
                "add_text_embeds": pooled.to(self.device, self.torch_dtype),
            }

    @property
    def pipe(self) -> Any:
        """DiffSynth's Kolors pipeline without ChatGLM and the VAE encoder: UNet (LoRA merged) and VAE decoder."""
        if self._pipe is None:
            self._pipe = self._load_denoiser()
        return self._pipe

    def _load_denoiser(self) -> Any:
        from diffsynth.pipelines.sdxl_image import SDXLImagePipeline
        from diffsynth.schedulers import EnhancedDDIMScheduler

        from kstory.core.models import load_kolors_model_manager

        log.info("loading the UNet and VAE decoder (%s on the %s)", str(self.torch_dtype).removeprefix("torch."),
                 self.device)
        manager = load_kolors_model_manager(self.weights, device=self.device, torch_dtype=self.torch_dtype,
                                            parts=("unet", "vae"))
        with contextlib.redirect_stdout(io.StringIO()):
            pipe = SDXLImagePipeline.from_model_manager(manager)
        # DiffSynth switches to Kolors' scheduler only when it sees ChatGLM, which this phase does not load.
        pipe.scheduler = EnhancedDDIMScheduler(beta_end=0.014, num_train_timesteps=1100)
        encoder, pipe.vae_encoder = pipe.vae_encoder, None
        manager.model.clear()
        free_models(encoder)
        if self.lora is not None:
            from kstory.core.lora import load_lora_into_pipeline

            self.lora_info = load_lora_into_pipeline(pipe, self.lora, scale=self.lora_scale)
        if self.loras:
            from kstory.core.lora_stack import merge_loras

            merge_loras(pipe.unet, self.loras)
        if not self.controlnets_per_batch:
            self.controlnets = {name: (cn, load(cn, self.device, self.torch_dtype))
                                for name, cn in self.controlnet_weights.items()}
        return pipe

    @property
    def controlnets_per_batch(self) -> bool:
        """Memory-short profiles hold only the ControlNets the batch being denoised uses (frames guided by pose
        and others by canny never hold both); the rest load all of them beside the UNet once."""
        return bool(self.memory and self.memory.profile in PER_BATCH_CONTROLNET_PROFILES)

    def _hold_controlnets(self, names: list[str]) -> None:
        """Exactly ``names`` resident (per-batch profiles): the others freed, the missing ones loaded."""
        for name in [held for held in self.controlnets if held not in names]:
            _, model = self.controlnets.pop(name)
            free_models(model)
            log.info("ControlNet %s freed: the next frames do not use it", name)
        for name in names:
            if name not in self.controlnets:
                weights = self.controlnet_weights[name]
                self.controlnets[name] = (weights, load(weights, self.device, self.torch_dtype))
                log.info("ControlNet %s loaded for these frames (memory profile %s: a batch's ControlNets at a "
                         "time)", name, self.memory.profile)

    def _should_release(self, release: str) -> bool:
        if release == "never" or not str(self.device).startswith("cuda"):
            return False
        return release == "always" or torch.cuda.mem_get_info()[0] < _FREE_MEMORY_FOR_TEXT_ENCODER

    @torch.no_grad()
    def denoise(self, batch: list[FramePlan], start: StartLatents | None = None,
                bank: AttentionBank | None = None) -> list[Image.Image]:
        """Generate one batch (same size, steps and sampler); returns one image per frame, in order."""
        latents = self.denoise_latents(batch, start, bank)
        # One frame at a time: the VAE at full size is the memory peak, and frames stay independent.
        # DiffSynth's tiles are 64 latents (512 px): a smaller frame is one tile, decoded whole.
        tiled = self.tiled_vae and max(latents.shape[-2:]) > _VAE_TILE
        return [self.pipe.decode_image(latents[i : i + 1], tiled=tiled) for i in range(len(batch))]

    @torch.no_grad()
    def denoise_latents(self, batch: list[FramePlan], start: StartLatents | None = None,
                        bank: AttentionBank | None = None) -> torch.Tensor:
        """The batch's final latents. ``start`` begins from a picture's latents (img2img) and, with a mask,
        keeps its latents outside the mask at every step, re-noised to that step (inpainting by blending).

        ``bank``: consistent attention across frames (kstory.story.consistent_attention), written by identity
        frames and read by the others; None leaves DiffSynth's attention untouched.
        """
        pipe, first = self.pipe, batch[0]
        sampler = make_sampler(first.sampler, first.steps, start.strength if start else 1.0, self.device)
        shape = (1, 4, first.height // 8, first.width // 8)
        # Each frame's noise from its own generator (DiffSynth's generate_noise); ancestral samplers keep drawing from it.
        generators = [torch.Generator(self.device).manual_seed(plan.seed) for plan in batch]
        noise = torch.cat([torch.randn(shape, generator=g, device=self.device, dtype=self.torch_dtype)
                           for g in generators])
        if start is None:
            latents = sampler.initial(noise)
        else:
            latents = sampler.noised(start.source, noise, sampler.timesteps[0]) if sampler.timesteps else start.source
        posi = [self._embeddings[(plan.prompt, True)] for plan in batch]
        nega = [self._embeddings[(plan.negative_prompt, False)] for plan in batch]
        prompt_emb = {key: torch.cat([e[key] for e in posi + nega]) for key in ("encoder_hidden_states", "add_text_embeds")}
        cfg = torch.tensor([plan.cfg_scale for plan in batch], device=self.device, dtype=self.torch_dtype).view(-1, 1, 1, 1)
        units = self._units(batch)
        unet = start.unet if start is not None and start.unet is not None else pipe.unet
        references = self.references.for_batch(batch, unet) or self.faces.for_batch(batch, unet)
        size, count = 2 * len(batch), len(sampler.timesteps)
        sharing = shared_attention(unet, bank, [(plan.index, plan.seed) for plan in batch])
        try:
            for step, timestep in enumerate(sampler.timesteps):
                sharing.at_step(step)
                model_input = sampler.scale(torch.cat([latents, latents]), timestep)
                extra = pipe.prepare_extra_input(model_input)
                if start is not None and start.condition is not None:  # Kolors-Inpainting: mask and masked picture
                    model_input = torch.cat([model_input, torch.cat([start.condition] * 2)], dim=1)
                control = GuidedControl(units, step, count, copies=2)
                noise_pred = lets_dance_xl(
                    unet, motion_modules=None, controlnet=control if control else None,
                    sample=model_input, timestep=timestep.unsqueeze(0).to(self.device), **extra, **prompt_emb,
                    controlnet_frames=control.frames().to(self.device, self.torch_dtype) if control else None,
                    ipadapter_kwargs_list=references.at(step, count) if references else {},
                    unet_batch_size=size, controlnet_batch_size=size, device=self.device,
                )
                noise_posi, noise_nega = noise_pred.chunk(2)
                latents = sampler.step(noise_nega + cfg * (noise_posi - noise_nega), timestep, latents, generators)
                if start is not None and start.keep is not None:
                    kept = start.source if step + 1 == count else sampler.noised(start.source, noise, sampler.timesteps[step + 1])
                    latents = start.keep * kept + (1 - start.keep) * latents
        finally:
            sharing.remove()
        return latents

    def _units(self, batch: list[FramePlan]) -> list[ControlUnit]:
        """One unit per (ControlNet, task) used in the batch; frames without such a guide get scale 0."""
        keys = []
        for plan in batch:
            for guide in plan.guides:
                if (guide.controlnet, guide.task) not in keys:
                    keys.append((guide.controlnet, guide.task))
        if self.controlnets_per_batch:
            self._hold_controlnets(list(dict.fromkeys(name for name, _ in keys)))
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

    def generate(self, groups: list[list[FramePlan]], bank: AttentionBank | None = None,
                 ) -> Iterator[tuple[list[FramePlan], list[Image.Image], float]]:
        """Yield (batch, images, seconds) batch by batch; out-of-memory becomes a KstoryError naming the knobs.

        ``bank`` is shared by the batches: identity frames' batches come first and fill it.
        """
        for batch in groups:
            started = time.perf_counter()
            with out_of_memory_named(_batch_described(batch), _OOM_FIX):
                images = self.denoise(batch, bank=bank)
            yield batch, images, time.perf_counter() - started


def _batch_described(batch: list[FramePlan]) -> str:
    """What was being done when memory ran out, for the message."""
    frames = ", ".join(str(plan.index) for plan in batch)
    first = batch[0]
    return (f"generating frames {frames} ({first.width}x{first.height}, {first.steps} steps, "
            f"{len(batch)} frames per batch)")


def _to_tensor(image: Image.Image) -> torch.Tensor:
    """A guide as ControlNets expect it: (3, H, W) in [0, 1] (what DiffSynth's process_image makes)."""
    import numpy as np

    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
