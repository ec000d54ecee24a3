"""The character reference of a story: which frames use it, its image tokens, and its keys/values per batch.

Phases, as for ChatGLM: the CLIP image encoder and the Resampler load, turn
every reference image (and the all-zero input of the negative branch) into
image tokens, and are freed before the UNet loads; only the image keys/values
of the cross-attention layers stay with the UNet. A ``frame: N`` reference is
the picture of frame N, so frames that use it wait for a later batch (a later
*wave*) and their tokens are made once frame N is on disk. A generated
character sheet is made before the first batch and is from then on a
reference image like any other (kstory.story.character_sheet).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.memory import free_models
from kstory.story.ip_adapter import (IpAdapterWeights, ImageKeysValues, active_scales, adapter_shape,
                                     check_compatible, cross_attention_sites, load_resampler, read_adapter)

log = get_logger("story")
REFERENCE_DIR = "references"  # the story folder's copies of reference images


@dataclass
class ReferencePlan:
    """One frame's use of the character reference."""

    scale: float
    start: float
    end: float
    frame: int | None = None  # the frame whose picture is the reference
    image: Image.Image | None = None  # a reference image file, loaded
    file: str | None = None  # its copy in the story folder (relative), with the original bytes
    sha256: str = ""  # of those bytes; for a frame reference, of the frame's PNG once it exists
    source: str | None = None  # the path as the spec wrote it
    data: bytes = field(default=b"", repr=False)
    sheet: Any = None  # kstory.story.character_sheet.CharacterSheet: the generated sheet this picture is

    def identity(self, frame_keys: dict[int, str], adapter: str) -> dict[str, Any]:
        """What decides the frame's pixels through the reference (a frame or a character sheet by its key)."""
        if self.frame:
            what: dict[str, Any] = {"frame": self.frame, "key": frame_keys.get(self.frame)}
        elif self.sheet is not None:
            what = {"sheet": self.sheet.key}
        else:
            what = {"sha256": self.sha256}
        return {"reference": what, "adapter": adapter, "scale": self.scale, "start": self.start, "end": self.end}


def load_reference_image(path: Path) -> tuple[bytes, Image.Image]:
    """The file's bytes and the decoded RGB picture; a missing or broken file is named."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise KstoryError(f"character reference image cannot be read ({error.strerror or error})", path=path,
                          fix="fix character.reference.image in the spec (relative to the spec file)") from error
    try:
        with Image.open(io.BytesIO(data)) as handle:
            image = handle.convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many kinds for a broken file
        raise KstoryError(f"character reference image is not a readable picture ({error})", path=path,
                          fix="use a PNG or JPEG file for character.reference.image") from error
    return data, image


def waves(plans: list[Any]) -> list[list[Any]]:
    """Frames that need no generated picture first, then those that use a frame reference (frame order kept)."""
    first = [p for p in plans if getattr(p, "reference", None) is None or p.reference.frame is None]
    later = [p for p in plans if p not in first]
    return [wave for wave in (first, later) if wave]


class References:
    """The Session's part for the IP-Adapter: tokens per reference, the UNet's image keys/values per batch."""

    def __init__(self, weights: IpAdapterWeights | None, device: str, torch_dtype: torch.dtype):
        self.weights, self.device, self.torch_dtype = weights, device, torch_dtype
        self.tokens: dict[str, torch.Tensor] = {}  # reference sha256 -> [1, T, C]
        self.negative: torch.Tensor | None = None
        self.frame_file: Callable[[int], Path] | None = None  # where frame N's picture is, once made
        self._state: dict[str, dict[str, torch.Tensor]] | None = None
        self._layers: ImageKeysValues | None = None

    def _adapter(self) -> dict[str, dict[str, torch.Tensor]]:
        if self._state is None:
            assert self.weights is not None
            self._state = read_adapter(self.weights.adapter)
            adapter_shape(self._state, self.weights.adapter)  # the SDXL adapter or a FaceID file: named here
        return self._state

    @torch.no_grad()
    def encode(self, plans: list[Any]) -> None:
        """The image-encoder phase: tokens of every reference image not encoded yet, then the encoder is freed."""
        wanted = {}
        for plan in plans:
            ref = getattr(plan, "reference", None)
            if ref is not None and ref.image is not None and ref.sha256 not in self.tokens:
                wanted[ref.sha256] = ref.image
        if wanted:
            self._encode(wanted)

    def _encode(self, images: dict[str, Image.Image]) -> None:
        from kstory.story.image_encoder import encode_references, image_processor, inspect_encoder, load_image_encoder

        assert self.weights is not None
        state = self._adapter()
        shape = adapter_shape(state, self.weights.adapter)
        info = inspect_encoder(self.weights.encoder)
        if info.hidden_size != shape.features:
            check_compatible(shape, info.hidden_size, info.layers, [], shape.output, self.weights.adapter,
                             self.weights.encoder)
        log.info("loading the image encoder for %d character reference(s)", len(images))
        encoder = load_image_encoder(self.weights.encoder, self.device, self.torch_dtype)
        resampler = load_resampler(state, self.weights.adapter).to(self.device, self.torch_dtype)
        hidden, zero = encode_references(encoder, image_processor(self.weights.encoder), list(images.values()))
        for i, digest in enumerate(images):
            self.tokens[digest] = resampler(hidden[i : i + 1])
        if self.negative is None:
            self.negative = resampler(zero)
        free_models(encoder, resampler)
        log.info("image encoder freed")

    def _frame_tokens(self, ref: ReferencePlan) -> None:
        """A frame reference: read frame N's picture (made in an earlier wave) and encode it."""
        if self.frame_file is None:
            raise KstoryError(f"frame {ref.frame} is the character reference but its picture is not available",
                              fix="generate the whole story (the reference frame first)")
        path = self.frame_file(ref.frame)
        data, image = load_reference_image(path)
        ref.sha256 = hashlib.sha256(data).hexdigest()
        if ref.sha256 not in self.tokens:
            self._encode({ref.sha256: image})

    def layers(self, unet: torch.nn.Module) -> ImageKeysValues:
        """The UNet's image keys/values, loaded once beside it (checked against its cross-attention layers)."""
        if self._layers is None:
            assert self.weights is not None
            state = self._adapter()
            shape = adapter_shape(state, self.weights.adapter)
            sites = cross_attention_sites(unet)
            width = unet.blocks[next(s.block for s in sites)].transformer_blocks[0].attn2.to_k.in_features
            from kstory.story.image_encoder import inspect_encoder

            info = inspect_encoder(self.weights.encoder)
            check_compatible(shape, info.hidden_size, info.layers, sites, width, self.weights.adapter,
                             self.weights.encoder)
            self._layers = ImageKeysValues(sites, shape.output).load_published(state["ip_adapter"],
                                                                               self.weights.adapter)
            self._layers.to(self.device, self.torch_dtype)
            self._state = {"image_proj": state["image_proj"], "ip_adapter": {}}  # the UNet part now lives there
        return self._layers

    @torch.no_grad()
    def for_batch(self, batch: list[Any], unet: torch.nn.Module) -> BatchReferences | None:
        """Keys/values for one batch (positive frames, then negative), or None when no frame uses a reference."""
        refs = [getattr(plan, "reference", None) for plan in batch]
        if self.weights is None or all(ref is None for ref in refs):
            return None
        for ref in refs:
            if ref is not None and ref.frame is not None:
                self._frame_tokens(ref)
        layers = self.layers(unet)
        assert self.negative is not None
        blank = torch.zeros_like(self.negative)
        positive = [self.tokens[ref.sha256] if ref else blank for ref in refs]
        negative = [self.negative if ref else blank for ref in refs]
        tokens = torch.cat(positive + negative)
        return BatchReferences(layers.kwargs_list(tokens, torch.zeros(len(tokens), 1, 1, 1, device=tokens.device,
                                                                      dtype=tokens.dtype)),
                               [ref.scale if ref else 0.0 for ref in refs], [ref.start if ref else 0.0 for ref in refs],
                               [ref.end if ref else 1.0 for ref in refs])

    def free(self) -> None:
        if self._layers is not None:
            free_models(self._layers)
            self._layers = None


class BatchReferences:
    """The ``ipadapter_kwargs_list`` of one batch; only the per-frame scales change from step to step."""

    def __init__(self, kwargs: dict[int, dict[int, dict[str, Any]]], scales: list[float], starts: list[float],
                 ends: list[float]):
        self.kwargs, self.scales, self.starts, self.ends = kwargs, scales, starts, ends

    def at(self, step: int, steps: int) -> dict[int, dict[int, dict[str, Any]]]:
        """The kwargs at ``step`` ({} when no frame's window is open: exactly the UNet without the adapter)."""
        scales = active_scales(self.scales, self.starts, self.ends, step, steps)
        if not any(scales):
            return {}
        first = next(iter(next(iter(self.kwargs.values())).values()))
        scale = torch.tensor(scales * 2, device=first["ip_k"].device, dtype=first["ip_k"].dtype).view(-1, 1, 1, 1)
        for per_block in self.kwargs.values():
            for entry in per_block.values():
                entry["scale"] = scale
        return self.kwargs
