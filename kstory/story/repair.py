"""Repairs of one frame: an img2img variation or a masked inpaint, applied on top of the generated frame.

A repaired frame is its generated picture plus a chain of repairs, each fully
recorded (kind, strength, seed, prompt, sampler, source and mask by hash), so
regenerating the frame and replaying the chain gives the same pixels; that is
how ``kstory verify`` checks a repaired frame.

* **img2img** encodes the source picture with the VAE encoder (loaded only for
  this), noises it to the step the strength selects and denoises from there.
* **inpaint** does the same while, at every step, the latents outside the mask
  are the source's re-noised to that step (latent blending), or, with a
  Kolors-Inpainting UNet, that UNet sees the mask and the masked picture
  (kstory.story.inpaint_input) and nothing is blended; either way the result is
  pasted over the source through the feathered mask, so pixels farther than
  the feather from the mask are the source's exactly. With a crop padding, the
  box around the mask is inpainted at the frame's full resolution and pasted back.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.memory import free_models
from kstory.story.generate import FramePlan, GuidePlan, Session, StartLatents
from kstory.story.manifest import png_bytes, sha256_bytes
from kstory.story.masks import crop_box, feathered, latent_region
from kstory.story.samplers import make_sampler

log = get_logger("story")
KINDS = ("img2img", "inpaint")
REPAIRS_DIR = "repairs"  # beside frames/ in the story folder: masks and outside source pictures


def check_strength(strength: float) -> float:
    if not 0 < strength <= 1:
        raise KstoryError(f"strength {strength} is outside (0, 1]",
                          fix="use a strength above 0 and at most 1 (0.3-0.6 keeps the composition, 1 repaints fully)")
    return float(strength)


@dataclass
class Repair:
    """One recorded repair; the fields up to ``crop_padding`` decide its pixels (with the picture it starts from)."""

    kind: str
    strength: float
    seed: int
    frame_prompt: str
    prompt: str  # the full prompt (trigger word, character, style, frame prompt)
    negative_prompt: str
    sampler: str
    steps: int
    cfg_scale: float
    source_file: str | None = None  # an outside picture stored in the story folder; None: the frame as it was
    source_sha256: str = ""  # sha256 of the source picture's PNG
    mask_file: str | None = None
    mask_sha256: str | None = None
    threshold: int | None = None  # recorded when the given mask was not black and white
    feather: int = 0
    crop_padding: int | None = None
    inpaint_model: dict[str, Any] | None = None  # the Kolors-Inpainting UNet's record; None: the story's own UNet
    whole_frame: bool = False
    sha256: str = ""  # the picture this repair made
    at: str = ""
    files: dict[str, Path] = field(default_factory=dict, repr=False)  # relative file -> where it is now
    inpaint_path: str | Path | None = field(default=None, repr=False)  # where the inpainting model is now, if given

    def key_data(self) -> dict[str, Any]:
        """What decides this repair's pixels given its starting picture (an outside source by its hash)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("sha256", "at", "files", "inpaint_path", "source_sha256", "whole_frame",
                                  "inpaint_model")}
        data["source"] = self.source_sha256 if self.source_file else "frame"
        if self.inpaint_model:  # by its weights, never where they lie (absent: the keys of older repairs stay)
            data["inpaint_model"] = self.inpaint_model["fingerprint"]
        return data

    def record(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("files")
        data.pop("inpaint_path")
        if data["inpaint_model"] is None:
            data.pop("inpaint_model")
        return data

    @classmethod
    def from_record(cls, record: dict[str, Any], folder: Path) -> Repair:
        """A recorded repair whose files (source, mask) are in ``folder``."""
        known = {f.name for f in fields(cls)} - {"files", "inpaint_path"}
        repair = cls(**{k: v for k, v in record.items() if k in known})
        for name in (repair.source_file, repair.mask_file):
            if name:
                repair.files[name] = Path(folder) / name
        return repair


def repaired_key(base_key: str, repairs: list[Repair]) -> str:
    """A frame's key after its repairs: its generation's key and each repair's settings."""
    data = [base_key, [r.key_data() for r in repairs]]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def repair_plan(plan: FramePlan, repair: Repair) -> FramePlan:
    """The frame's plan (size, guides) with the repair's seed, prompts, sampler, steps and CFG."""
    return FramePlan(index=plan.index, prompt=repair.prompt, frame_prompt=repair.frame_prompt,
                     negative_prompt=repair.negative_prompt, seed=repair.seed, width=plan.width, height=plan.height,
                     steps=repair.steps, cfg_scale=repair.cfg_scale, guides=list(plan.guides), sampler=repair.sampler)


def load_picture(path: Path, what: str, sha256: str | None = None) -> Image.Image:
    """An RGB picture, checked against its recorded hash when one is given."""
    if not Path(path).is_file():
        raise KstoryError(f"{what} is missing", path=path, fix="restore it, or repackage / regenerate the story")
    if sha256 is not None and sha256_bytes(Path(path).read_bytes()) != sha256:
        raise KstoryError(f"{what} changed since the repair was made", path=path,
                          fix="restore the original file, or generate the frame again")
    with Image.open(path) as handle:
        return handle.convert("RGB")


class SourceEncoder:
    """The networks only repairs need, loaded on first use (a story without repairs never loads them): the VAE
    encoder, and the Kolors-Inpainting UNets the repairs name."""

    def __init__(self, session: Session):
        self.session = session
        self.model: torch.nn.Module | None = None
        self.unets: dict[str, torch.nn.Module] = {}  # fingerprint -> inpainting UNet (LoRA merged)

    def inpaint_unet(self, repair: Repair) -> torch.nn.Module:
        """The inpainting UNet ``repair`` records, found by its fingerprint (at ``inpaint_path`` or the recorded spec)."""
        from kstory.story.inpaint_model import find_recorded_inpaint_model, load_inpaint_unet

        record = repair.inpaint_model
        assert record is not None
        if record["fingerprint"] not in self.unets:
            model = find_recorded_inpaint_model(record, repair.inpaint_path)
            log.info("loading the Kolors-Inpainting UNet %s", model.spec)
            session = self.session
            self.unets[record["fingerprint"]] = load_inpaint_unet(model, session.device, session.torch_dtype,
                                                                  session.lora, session.lora_scale)
        return self.unets[record["fingerprint"]]

    def encode(self, image: Image.Image) -> torch.Tensor:
        """(1, 4, H/8, W/8) latents of ``image`` (the encoder's mean, as DiffSynth's img2img uses)."""
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) * (2 / 255) - 1).permute(2, 0, 1)[None]
        return self.encode_pixels(pixels)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents of (1, 3, H, W) pixels in [-1, 1]."""
        session = self.session
        if self.model is None:
            from kstory.core.models import load_kolors_model_manager

            log.info("loading the VAE encoder for the repair")
            manager = load_kolors_model_manager(session.weights, device=session.device,
                                                torch_dtype=session.torch_dtype, parts=("vae",))
            with contextlib.redirect_stdout(io.StringIO()):  # DiffSynth prints which file each model came from
                self.model = manager.fetch_model("sdxl_vae_encoder")
            others = [m for m in manager.model if m is not self.model]
            manager.model.clear()
            free_models(*others)
        tiled = session.tiled_vae and max(pixels.shape[-2:]) > 512
        return self.model(pixels.to(session.device, session.torch_dtype), tiled=tiled).to(session.torch_dtype)

    def free(self) -> None:
        unets, self.unets = list(self.unets.values()), {}
        if self.model is not None:
            unets.append(self.model)
            self.model = None
        if unets:
            free_models(*unets)


def _denoise_from(session: Session, encoder: SourceEncoder, plan: FramePlan, source: Image.Image, strength: float,
                  region: np.ndarray | None, unet: torch.nn.Module | None = None,
                  mask: np.ndarray | None = None) -> Image.Image:
    """One denoising of ``plan`` from ``source``: img2img; inpainting by blending when ``region`` marks latents to
    repaint; with an inpainting ``unet``, inpainting by that UNet given the binary ``mask``."""
    if not make_sampler(plan.sampler, plan.steps, strength).timesteps:
        log.warning("strength %g leaves no step of %d to run: the frame is the source picture", strength, plan.steps)
        return source.copy()
    latents = encoder.encode(source)
    if unet is not None:
        from kstory.story.inpaint_input import inpaint_condition

        condition = inpaint_condition(encoder, source, mask).to(session.device, session.torch_dtype)
        start = StartLatents(latents, strength, condition=condition, unet=unet)
    else:
        keep = None
        if region is not None:
            keep = torch.from_numpy(1.0 - region)[None, None].to(session.device, session.torch_dtype)
        start = StartLatents(latents, strength, keep)
    (image,) = session.denoise([plan], start)
    return image


def _cropped(plan: FramePlan, box: tuple[int, int, int, int]) -> FramePlan:
    """The plan with each guide cut to ``box`` and scaled to the frame, so guides stay on the crop's content."""
    out = copy.copy(plan)
    size = (plan.width, plan.height)
    out.guides = [GuidePlan(**{**vars(g), "image": g.image.crop(box).resize(size, Image.BILINEAR)})
                  for g in plan.guides]
    return out


def _inpaint(session: Session, encoder: SourceEncoder, plan: FramePlan, repair: Repair, source: Image.Image,
             mask: np.ndarray) -> Image.Image:
    weights = feathered(mask, repair.feather)
    size = (plan.width, plan.height)
    unet = encoder.inpaint_unet(repair) if repair.inpaint_model else None
    if repair.crop_padding is not None and not repair.whole_frame:
        box = crop_box(weights > 0, repair.crop_padding)
        box_size = (box[2] - box[0], box[3] - box[1])
        crop_weights = np.asarray(Image.fromarray(weights[box[1]:box[3], box[0]:box[2]]).resize(size, Image.BILINEAR))
        crop_mask = np.asarray(Image.fromarray(mask[box[1]:box[3], box[0]:box[2]]).resize(size, Image.NEAREST))
        made = _denoise_from(session, encoder, _cropped(plan, box), source.crop(box).resize(size, Image.LANCZOS),
                             repair.strength, latent_region(crop_weights), unet, crop_mask)
        generated = source.copy()
        generated.paste(made.resize(box_size, Image.LANCZOS), box[:2])
    else:
        generated = _denoise_from(session, encoder, plan, source, repair.strength, latent_region(weights), unet, mask)
    alpha = weights[..., None]
    blended = np.asarray(source, dtype=np.float32) * (1 - alpha) + np.asarray(generated, dtype=np.float32) * alpha
    return Image.fromarray(np.rint(blended).astype(np.uint8))


def apply_repair(session: Session, encoder: SourceEncoder, plan: FramePlan, repair: Repair,
                 image: Image.Image) -> Image.Image:
    """The picture after ``repair``, starting from ``image`` (the frame as it was) or the repair's own source."""
    source = image
    if repair.source_file:
        source = load_picture(repair.files[repair.source_file], "the repair's source picture", repair.source_sha256)
    else:
        repair.source_sha256 = sha256_bytes(png_bytes(image))
    work = repair_plan(plan, repair)
    if repair.kind == "img2img":
        result = _denoise_from(session, encoder, work, source, repair.strength, None)
    else:
        mask_image = load_picture(repair.files[repair.mask_file], "the repair's mask", repair.mask_sha256)
        result = _inpaint(session, encoder, work, repair, source, np.asarray(mask_image.convert("L")) >= 128)
    repair.sha256 = sha256_bytes(png_bytes(result))
    return result


def apply_repairs(session: Session, plan: FramePlan, image: Image.Image) -> Image.Image:
    """Replay every repair of ``plan`` on its generated picture, in order."""
    encoder = SourceEncoder(session)
    try:
        for repair in plan.repairs:
            image = apply_repair(session, encoder, plan, repair, image)
    finally:
        encoder.free()
    return image
