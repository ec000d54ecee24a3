"""Encode every caption (ChatGLM) and image (VAE) once, into safetensors files on disk.

The UNet step then reads small tensors instead of running a 6B-parameter text
encoder and the VAE each step, and those two models can be freed before
training. Entries are keyed by content: the caption text or the image bytes,
plus the model fingerprint (folder name) and the bucket size (file name), so
re-running on the same data is instant and changed data is never served stale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from kstory.core.atomic import atomic_path
from kstory.core.errors import KstoryError
from kstory.core.images import strict_decoding, to_rgb8
from kstory.core.logs import get_logger
from kstory.train.buckets import Size, fit_to, target_size
from kstory.train.dataset import Sample

CACHE_FORMAT = "v2"  # v2: pictures deeper than 8 bits are scaled (kstory.images.to_rgb8), not clamped
PROMPT_LENGTH = 256  # DiffSynth's KolorsPrompter pads every prompt to 256 tokens

log = get_logger("train")


@dataclass(frozen=True)
class CachedSample:
    """Where one sample's tensors live, and the bucket it trains in."""

    latent: Path  # safetensors: "latent" [4, h/8, w/8] (+ "latent_flipped")
    text: Path  # safetensors: "prompt_emb" [256, D], "pooled" [D]
    size: Size  # (width, height) in pixels
    image: Path


@dataclass(frozen=True)
class TrainCache:
    """The encoded dataset, the empty caption (for caption dropout) and validation prompts."""

    samples: list[CachedSample]
    empty_text: Path
    validation_texts: dict[str, Path]
    root: Path


def cache_root(base: Path, fingerprint: str, text_dtype: torch.dtype, extra: str = "") -> Path:
    """One folder per base model and encoder precision (``extra``: where captions were encoded, if elsewhere)."""
    tag = str(text_dtype).removeprefix("torch.")
    return Path(base) / f"{CACHE_FORMAT}-{fingerprint[:16]}-{tag}{extra}"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def text_key(text: str) -> str:
    return _digest(text.encode("utf-8"))


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so a truncated file fails here, naming the file) to 8-bit RGB.

    Uses the decode rule prep uses (:func:`kstory.images.to_rgb8`), so a
    16-bit picture trains as what it shows, not as a white square; values
    without a known white level fail here like a broken file.
    """
    try:
        with strict_decoding(), Image.open(path) as image:
            image.load()
            rgb = to_rgb8(image)
            return rgb.copy() if rgb is image else rgb  # closing the file closes an image returned as is
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise KstoryError(
            f"cannot decode image: {error}", path=path,
            fix="remove it from metadata.csv (or re-run 'kstory prep', which drops unreadable images)",
        ) from error


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) read from the header, with the same error as a failed decode."""
    try:
        with Image.open(path) as image:
            return image.size
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise KstoryError(
            f"cannot decode image: {error}", path=path,
            fix="remove it from metadata.csv (or re-run 'kstory prep', which drops unreadable images)",
        ) from error


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> [1, 3, H, W] in [-1, 1], as DiffSynth's ``preprocess_image`` does."""
    array = np.asarray(image, dtype=np.float32) * (2 / 255) - 1
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


def _valid(path: Path, keys: tuple[str, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(keys) <= set(handle.keys())
    except (SafetensorError, OSError, ValueError):
        return False  # a damaged entry is simply rebuilt


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))


class Encoders:
    """The text encoder and VAE encoder (either may be None when nothing needs it), only while caching."""

    def __init__(self, text_encoder: torch.nn.Module | None, vae_encoder: torch.nn.Module | None,
                 device: torch.device, text_device: torch.device | None = None):
        from diffsynth.prompters import KolorsPrompter

        self.device = device
        self.text_device = text_device or device
        self.text_encoder = text_encoder
        self.vae_encoder = vae_encoder
        self.prompter = None
        self.streamed = None  # a StreamedChatGLM: every caption through one block at a time
        if text_encoder is not None and not isinstance(text_encoder, torch.nn.Module):
            self.streamed, self.text_encoder = text_encoder, None
        elif text_encoder is not None:
            self.prompter = KolorsPrompter()
            self.prompter.fetch_models(text_encoder)

    def release(self) -> None:
        """Drop every reference to the networks, so freeing them frees their memory."""
        self.text_encoder = self.vae_encoder = self.prompter = self.streamed = None

    @torch.no_grad()
    def encode_text(self, text: str) -> dict[str, torch.Tensor]:
        self.text_encoder.to(self.text_device)
        pooled, prompt_emb = self.prompter.encode_prompt(text, clip_skip=1, clip_skip_2=2, positive=True,
                                                         device=self.text_device)
        return {"prompt_emb": prompt_emb[0].float(), "pooled": pooled[0].float()}

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """``encode_text`` of each, in order; the streamed encoder takes them all through each block at once."""
        if self.streamed is None:
            return [self.encode_text(text) for text in texts]
        return [{"prompt_emb": prompt_emb[0].float(), "pooled": pooled[0].float()}
                for pooled, prompt_emb in self.streamed.encode([(text, True) for text in texts])]

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        self.vae_encoder.to(self.device)
        dtype = next(self.vae_encoder.parameters()).dtype
        return self.vae_encoder(pixels.to(self.device, dtype))[0].float()


def build_cache(
    samples: list[Sample], encoders: Encoders | None, root: Path, *, resolution: int, center_crop: bool,
    random_flip: bool, extra_texts: list[str] = (),
) -> TrainCache:
    """Encode what is not cached yet; with ``encoders=None`` only report what is missing.

    Raises :class:`MissingCache` when encoders are needed but not given, so a
    caller can skip loading the text encoder and VAE when everything is cached.
    """
    latent_keys = ("latent", "latent_flipped") if random_flip else ("latent",)
    cached, todo_text, todo_images = [], {}, []
    for sample in samples:
        size = target_size(*image_size(sample.image), resolution, center_crop)
        digest = _digest(sample.image.read_bytes())
        latent = root / "latents" / f"{digest}-{size[0]}x{size[1]}.safetensors"
        text = root / "text" / f"{text_key(sample.text)}.safetensors"
        entry = CachedSample(latent, text, size, sample.image)
        cached.append(entry)
        if not _valid(latent, latent_keys):
            todo_images.append(entry)
        if not _valid(text, ("prompt_emb", "pooled")):
            todo_text[text] = sample.text
    texts = {t: root / "text" / f"{text_key(t)}.safetensors" for t in ["", *extra_texts]}
    for text, path in texts.items():
        if not _valid(path, ("prompt_emb", "pooled")):
            todo_text[path] = text
    if todo_text or todo_images:
        if encoders is None:
            raise MissingCache(len(todo_text), len(todo_images))
        log.info("caching %d caption(s) and %d image(s) in %s", len(todo_text), len(todo_images), root)
        for path, tensors in zip(todo_text, encoders.encode_texts(list(todo_text.values()))):
            _save(path, tensors)
        for entry in todo_images:
            image = fit_to(open_rgb(entry.image), entry.size)
            tensors = {"latent": encoders.encode_image(to_tensor(image))}
            if random_flip:
                flipped = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                tensors["latent_flipped"] = encoders.encode_image(to_tensor(flipped))
            _save(entry.latent, tensors)
    validation = {t: p for t, p in texts.items() if t}
    return TrainCache(cached, texts[""], validation, root)


class MissingCache(Exception):
    """Some entries still need the encoders."""

    def __init__(self, texts: int, images: int):
        super().__init__(f"{texts} caption(s) and {images} image(s) are not cached yet")
        self.texts, self.images = texts, images
