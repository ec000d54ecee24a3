"""The face of a story (FaceID-Plus) between the spec, the Session and the manifest.

Phases, as for the picture reference: the CLIP encoder and the face projection
load, turn every face (and the all-zero negative) into face tokens, and are
freed before the UNet loads; the tokens pass the UNet's text projection and the
face keys/values once the UNet is there. The embedding and the crop are copied
into the story folder (``references/face.npy``, ``references/face-crop.png``),
so a package ships them and ``kstory verify`` needs no insightface.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.memory import free_models
from kstory.story.face_spec import face_frames
from kstory.story.references import REFERENCE_DIR, BatchReferences, load_reference_image

log = get_logger("story")
EMBEDDING_FILE = f"{REFERENCE_DIR}/face.npy"
CROP_FILE = f"{REFERENCE_DIR}/face-crop.png"
TINY = "tiny"


@dataclass
class FacePlan:
    """One frame's use of the face: the embedding and crop (bytes as stored), the scale and window."""

    scale: float
    start: float
    end: float
    embedding: np.ndarray = field(repr=False)
    crop: Image.Image = field(repr=False)
    embedding_data: bytes = field(default=b"", repr=False)
    crop_data: bytes = field(default=b"", repr=False)
    source: str | None = None

    @property
    def digest(self) -> str:
        """What decides the face tokens: the embedding's and the crop's bytes."""
        return hashlib.sha256(hashlib.sha256(self.embedding_data).digest()
                              + hashlib.sha256(self.crop_data).digest()).hexdigest()

    def entry(self, adapter: Any) -> dict[str, Any]:
        """The manifest's ``face_id`` of one frame."""
        return {"embedding": {"file": EMBEDDING_FILE, "sha256": hashlib.sha256(self.embedding_data).hexdigest()},
                "crop": {"file": CROP_FILE, "sha256": hashlib.sha256(self.crop_data).hexdigest()},
                "source": self.source, "adapter": adapter.record() if adapter else None, "scale": self.scale,
                "start": self.start, "end": self.end}


def _npy_bytes(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, values.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def face_plans(spec: Any, spec_dir: Path) -> dict[int, FacePlan]:
    """1-based frame -> its face plan, for every frame that uses ``character.face``."""
    from kstory.story.face_detect import detect_face, load_embedding

    face, used = spec.character.face, face_frames(spec)
    if face is None or not used:
        return {}

    def where(path: Path) -> Path:
        return path if path.is_absolute() else spec_dir / path

    if face.image is not None:
        _, photo = load_reference_image(where(face.image))
        embedding, crop = detect_face(photo, where(face.image))
        crop_data, source = _png_bytes(crop), face.image.as_posix()
    else:
        embedding = load_embedding(where(face.embedding))
        crop_data, crop = load_reference_image(where(face.crop))
        source = face.embedding.as_posix()
    embedding_data = _npy_bytes(embedding)
    return {index: FacePlan(scale, face.start, face.end, embedding, crop, embedding_data, crop_data, source)
            for index, scale in used.items()}


def face_keyed(key: str, plan: Any, adapter: Any) -> str:
    """A frame's key with its face folded in (frames without one keep their key)."""
    face = getattr(plan, "face", None)
    if face is None:
        return key
    identity = {"face": face.digest, "adapter": adapter.sha256 if adapter else "", "scale": face.scale,
                "start": face.start, "end": face.end}
    return hashlib.sha256(json.dumps([key, identity], sort_keys=True).encode()).hexdigest()


def write_face_files(out_dir: Path, plans: list[Any], keep: set[int]) -> None:
    """Copy the embedding and crop into the story folder (once per story: every frame shares one face)."""
    from kstory.core.atomic import write_bytes

    face = next((p.face for p in plans if p.index in keep and getattr(p, "face", None) is not None), None)
    if face is not None:
        write_bytes(out_dir / EMBEDDING_FILE, face.embedding_data)
        write_bytes(out_dir / CROP_FILE, face.crop_data)


def resolve_face_adapter(spec: Any, spec_dir: Path, given: str | Path | None, cache_dir: Path | None) -> Any:
    """The FaceID-Plus adapter: ``given`` over the spec's ``adapter``; ``tiny`` builds one."""
    from kstory.story.face_adapter import identify_face_adapter

    face = spec.character.face
    if face is None or not face_frames(spec):
        return None
    choice = str(given) if given is not None else face.adapter
    if not choice:
        raise KstoryError("character.face needs the Kolors IP-Adapter-FaceID-Plus, and none was given",
                          fix="set character.face.adapter in the spec (the Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus "
                              "folder; 'tiny' for the offline test one)")
    if choice == TINY:
        from kstory.story.tiny_face_adapter import build_tiny_face_adapter

        return identify_face_adapter(build_tiny_face_adapter(cache_dir))
    path = Path(choice)
    return identify_face_adapter(path if path.is_absolute() or given is not None else spec_dir / path)


def find_recorded_face_adapter(record: dict[str, Any] | None, given: str | Path | None,
                               cache_dir: Path | None) -> Any:
    """The FaceID-Plus adapter a manifest names, found by hash: ``given``, the tiny one, or the recorded path."""
    from kstory.story.face_adapter import identify_face_adapter

    if not record:
        return None
    candidates = [Path(given)] if given is not None and str(given) != TINY else []
    if record.get("tiny"):
        from kstory.story.tiny_face_adapter import build_tiny_face_adapter

        candidates.append(build_tiny_face_adapter(cache_dir))
    candidates.append(Path(record["path"]))
    for path in candidates:
        try:
            found = identify_face_adapter(path)
        except KstoryError:
            continue
        if found.sha256 == record["sha256"]:
            return found
    raise KstoryError(f"the FaceID-Plus adapter the story used (sha256 {record['sha256'][:12]}) was not found",
                      path=record.get("path"), fix="pass the adapter the story was made with")


class FaceReferences:
    """The Session's part for FaceID-Plus: face tokens per face, the UNet's face keys/values per batch."""

    def __init__(self, weights: Any, device: str, torch_dtype: torch.dtype):
        self.weights, self.device, self.torch_dtype = weights, device, torch_dtype
        self.tokens: dict[str, torch.Tensor] = {}  # face digest -> [1, 6, 4096], before the text projection
        self.negative: dict[str, torch.Tensor] = {}
        self._state: dict[str, dict[str, torch.Tensor]] | None = None
        self._layers: Any = None

    def _adapter(self) -> dict[str, dict[str, torch.Tensor]]:
        from kstory.story.face_adapter import face_shape, read_face_adapter

        if self._state is None:
            self._state = read_face_adapter(self.weights.adapter)
            face_shape(self._state, self.weights.adapter)
        return self._state

    @torch.no_grad()
    def encode(self, plans: list[Any]) -> None:
        """The encoder phase: CLIP features of each new face crop and the face projection, then both are freed."""
        from kstory.story.face_adapter import check_embedding, face_shape, load_face_projection
        from kstory.story.image_encoder import image_processor, inspect_encoder, load_image_encoder

        faces = {p.face.digest: p.face for p in plans if getattr(p, "face", None) is not None}
        faces = {k: v for k, v in faces.items() if k not in self.tokens}
        if not faces or self.weights is None:
            return
        state = self._adapter()
        shape = face_shape(state, self.weights.adapter)
        info = inspect_encoder(self.weights.encoder)
        if info.hidden_size != shape.features:
            raise KstoryError(f"wrong face image encoder: it gives {info.hidden_size}-wide features, the adapter reads "
                              f"{shape.features}-wide ones", path=self.weights.encoder,
                              fix="use the clip-vit-large-patch14-336/ folder of Kolors-IP-Adapter-FaceID-Plus")
        log.info("loading the face encoder for %d face(s)", len(faces))
        encoder = load_image_encoder(self.weights.encoder, self.device, self.torch_dtype)
        projection = load_face_projection(state, self.weights.adapter).to(self.device, self.torch_dtype)
        processor = image_processor(self.weights.encoder)
        for digest, face in faces.items():
            pixels = processor(images=[face.crop.convert("RGB")], return_tensors="pt").pixel_values
            hidden = encoder(pixels.to(self.device, self.torch_dtype), output_hidden_states=True).hidden_states[-2]
            embedding = check_embedding(torch.from_numpy(face.embedding), shape, face.source)
            embedding = embedding.to(self.device, self.torch_dtype)
            self.tokens[digest] = projection(embedding, hidden)
            self.negative[digest] = projection(torch.zeros_like(embedding), torch.zeros_like(hidden))
        free_models(encoder, projection)
        log.info("face encoder freed")

    @torch.no_grad()
    def for_batch(self, batch: list[Any], unet: torch.nn.Module) -> BatchReferences | None:
        """Face keys/values for one batch (positive frames, then negative), or None when no frame uses a face."""
        from kstory.story.face_adapter import check_face_compatible, face_keys_values, face_shape
        from kstory.story.image_encoder import inspect_encoder

        faces = [getattr(plan, "face", None) for plan in batch]
        if self.weights is None or all(face is None for face in faces):
            return None
        if self._layers is None:
            state = self._adapter()
            check_face_compatible(face_shape(state, self.weights.adapter), unet,
                                  inspect_encoder(self.weights.encoder).hidden_size, self.weights.adapter,
                                  self.weights.encoder)
            self._layers = face_keys_values(state, unet, self.weights.adapter).to(self.device, self.torch_dtype)
        project = unet.text_intermediate_proj
        first = next(face for face in faces if face is not None)
        blank = torch.zeros_like(project(self.tokens[first.digest]))
        positive = [project(self.tokens[f.digest]) if f else blank for f in faces]
        negative = [project(self.negative[f.digest]) if f else blank for f in faces]
        tokens = torch.cat(positive + negative)
        scales = torch.zeros(len(tokens), 1, 1, 1, device=tokens.device, dtype=tokens.dtype)
        return BatchReferences(self._layers.kwargs_list(tokens, scales), [f.scale if f else 0.0 for f in faces],
                               [f.start if f else 0.0 for f in faces], [f.end if f else 1.0 for f in faces])

    def free(self) -> None:
        if self._layers is not None:
            free_models(self._layers)
            self._layers = None
