"""Kolors IP-Adapter-FaceID-Plus on DiffSynth's Kolors UNet: a person's face for chosen frames.

Kolors routes the face differently from the IP-Adapter-Plus. A 512-d
insightface ``antelopev2`` embedding becomes 6 tokens of width 4096 (an MLP,
then a 4-layer perceiver that reads the CLIP ViT-L/14-336 hidden states of a
336 px face crop, added back as a shortcut); the official pipeline appends them
after the 256 ChatGLM tokens, so they pass through the UNet's
``encoder_hid_proj`` (Kolors' 4096->2048 text projection, DiffSynth's
``text_intermediate_proj``), and every cross-attention layer splits them off
again into its own ``to_k_ip`` / ``to_v_ip`` attention, added at the face scale
(0.8 in the official sample). That is exactly DiffSynth's ``ipadapter_kwargs``
with tokens ``text_intermediate_proj(face_tokens)``, so each frame of a batch
keeps its own face and scale as with the IP-Adapter-Plus (``ImageKeysValues``).
The negative branch projects an all-zero embedding and all-zero CLIP features,
as the official pipeline does.

The published ``ipa-faceid-plus.bin`` is a pickle of ``{"image_proj": ...,
"adapter_modules": ...}`` (read only with ``weights_only=True``); a flat
safetensors form with ``image_proj.*`` and ``adapter_modules.*`` (or
``ip_adapter.*``) keys loads too. The CLIP encoder is the folder
``clip-vit-large-patch14-336/`` beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kstory.core.errors import KstoryError
from kstory.story.adapter_files import AdapterFiles, AdapterWeights, find_adapter, read_weights
from kstory.story.ip_adapter import HEAD_DIM, ImageKeysValues, cross_attention_sites, perceiver_layers

FACE_ADAPTER_NAMES = ("ipa-faceid-plus.safetensors", "ipa-faceid-plus.bin")
FACE_ENCODER_DIR = "clip-vit-large-patch14-336"
DEFAULT_FACE_SCALE = 0.8  # the official Kolors FaceID-Plus sample's value
EMBEDDING_WIDTH = 512  # insightface antelopev2 (glintr100) face embeddings
_FIX = ("use Kwai-Kolors/Kolors-IP-Adapter-FaceID-Plus: a folder with ipa-faceid-plus.bin and "
        "clip-vit-large-patch14-336/ (CLIP ViT-L/14, 336 px)")


FACE_ADAPTER_FILES = AdapterFiles(kind="kolors-ip-adapter-faceid-plus", what="IP-Adapter-FaceID-Plus",
                                  names=FACE_ADAPTER_NAMES, encoder_dir=FACE_ENCODER_DIR, fix=_FIX)
FaceAdapterWeights = AdapterWeights  # the FaceID-Plus adapter on disk (kind kolors-ip-adapter-faceid-plus)


def identify_face_adapter(path: Path) -> FaceAdapterWeights:
    """Find ``ipa-faceid-plus.bin`` and ``clip-vit-large-patch14-336/`` in ``path`` (or beside the weight file)."""
    return find_adapter(path, FACE_ADAPTER_FILES)


def read_face_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` from the published pickle (``adapter_modules``) or safetensors."""
    state = read_weights(Path(path), FACE_ADAPTER_FILES)
    if not isinstance(state, dict):
        raise KstoryError("not an IP-Adapter file: it holds no weight dictionary", path=path, fix=_FIX)
    layers = state.get("adapter_modules") or state.get("ip_adapter")
    if not state.get("image_proj") or not layers:
        raise KstoryError("not a FaceID-Plus file: it needs image_proj and adapter_modules (or ip_adapter) weights",
                          path=path, fix=_FIX)
    return {"image_proj": {k: v for k, v in state["image_proj"].items() if isinstance(v, torch.Tensor)},
            "ip_adapter": {k: v for k, v in layers.items() if isinstance(v, torch.Tensor)}}


@dataclass(frozen=True)
class FaceShape:
    """The adapter's sizes, read from its tensors."""

    embedding: int  # face embedding width (512)
    features: int  # CLIP hidden width it reads (1024)
    width: int  # token width = ChatGLM's hidden size (4096), before the UNet's text projection
    depth: int
    heads: int
    tokens: int  # face tokens per frame (6)
    layers: int  # cross-attention layers with face keys/values (70)


def face_shape(state: dict[str, dict[str, torch.Tensor]], path: Path) -> FaceShape:
    """The adapter's sizes; an IP-Adapter-Plus, SDXL or plain FaceID file is named, not shape-dumped."""
    proj = state["image_proj"]
    if "perceiver_resampler.proj_in.weight" not in proj:
        if "latents" in proj:
            kind = "the IP-Adapter-Plus (a picture reference): give it as character.reference.adapter"
        elif "proj.weight" in proj:
            kind = "the SDXL IP-Adapter (4 image tokens from ViT-bigG), which does not suit Kolors"
        elif "proj.0.weight" in proj and "norm.weight" in proj:
            kind = "a FaceID adapter without the Plus perceiver (not the Kolors one)"
        else:
            kind = "an unknown image projection"
        raise KstoryError(f"this is {kind}, not the Kolors IP-Adapter-FaceID-Plus", path=path, fix=_FIX)
    needed = ("proj.0.weight", "proj.2.weight", "norm.weight", "perceiver_resampler.layers.0.0.to_q.weight")
    missing = [key for key in needed if key not in proj]
    if missing:
        raise KstoryError(f"image_proj lacks {', '.join(missing)}: not the FaceID-Plus layout", path=path, fix=_FIX)
    width = proj["norm.weight"].shape[0]
    layer_keys = [key for key in state["ip_adapter"] if key.endswith("to_k_ip.weight")]
    return FaceShape(
        embedding=proj["proj.0.weight"].shape[1], features=proj["perceiver_resampler.proj_in.weight"].shape[1],
        width=width, depth=len({key.split(".")[2] for key in proj if key.startswith("perceiver_resampler.layers.")}),
        heads=proj["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // HEAD_DIM,
        tokens=proj["proj.2.weight"].shape[0] // width, layers=len(layer_keys),
    )


class _FacePerceiver(torch.nn.Module):
    """The perceiver of FaceID-Plus: the face tokens read the CLIP features (keys ``perceiver_resampler.*``)."""

    def __init__(self, features: int, width: int, depth: int, heads: int):
        super().__init__()
        self.proj_in = torch.nn.Linear(features, width)
        self.proj_out = torch.nn.Linear(width, width)
        self.norm_out = torch.nn.LayerNorm(width)
        self.layers = perceiver_layers(width, heads, depth)

    def forward(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


class FaceProjection(torch.nn.Module):
    """Face embedding + CLIP features of the crop -> ``tokens`` face tokens (the official shortcut at scale 1)."""

    def __init__(self, shape: FaceShape):
        super().__init__()
        self.tokens, self.width = shape.tokens, shape.width
        self.proj = torch.nn.Sequential(torch.nn.Linear(shape.embedding, 2 * shape.embedding), torch.nn.GELU(),
                                        torch.nn.Linear(2 * shape.embedding, shape.width * shape.tokens))
        self.norm = torch.nn.LayerNorm(shape.width)
        self.perceiver_resampler = _FacePerceiver(shape.features, shape.width, shape.depth, shape.heads)

    def forward(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        tokens = self.norm(self.proj(embedding).reshape(-1, self.tokens, self.width))
        return tokens + self.perceiver_resampler(tokens, features)


def load_face_projection(state: dict[str, dict[str, torch.Tensor]], path: Path) -> FaceProjection:
    model = FaceProjection(face_shape(state, path))
    try:
        model.load_state_dict(state["image_proj"], strict=True)
    except RuntimeError as error:
        lines = str(error).splitlines()
        raise KstoryError(f"image_proj does not have the FaceID-Plus layout ({(lines[1] if len(lines) > 1 else lines[0]).strip()})",
                          path=path, fix=_FIX) from error
    return model.eval()


def check_face_compatible(shape: FaceShape, unet: torch.nn.Module, encoder_width: int, path: Path,
                          encoder: Path) -> None:
    """Refuse a wrong CLIP or base model with the mismatch in words, before any shape error could."""
    if encoder_width != shape.features:
        raise KstoryError(f"wrong face image encoder: it gives {encoder_width}-wide features, the adapter "
                          f"{path.name} reads {shape.features}-wide ones (CLIP ViT-L/14: 1024)", path=encoder, fix=_FIX)
    text_proj = getattr(unet, "text_intermediate_proj", None)
    if text_proj is None:
        raise KstoryError("this UNet has no Kolors text projection (encoder_hid_proj): FaceID-Plus needs Kolors",
                          path=path, fix=_FIX)
    if text_proj.in_features != shape.width:
        raise KstoryError(f"the adapter makes {shape.width}-wide face tokens, this UNet's text projection takes "
                          f"{text_proj.in_features}: it belongs to another base model", path=path, fix=_FIX)
    sites = cross_attention_sites(unet)
    if shape.layers != len(sites):
        raise KstoryError(f"the adapter has face keys/values for {shape.layers} cross-attention layers, this UNet "
                          f"has {len(sites)}: it belongs to another base model", path=path, fix=_FIX)


def face_keys_values(state: dict[str, dict[str, torch.Tensor]], unet: torch.nn.Module, path: Path) -> ImageKeysValues:
    """``to_k_ip`` / ``to_v_ip`` of every cross-attention layer; they read tokens after the text projection."""
    sites = cross_attention_sites(unet)
    return ImageKeysValues(sites, unet.text_intermediate_proj.out_features).load_published(state["ip_adapter"], path)


def check_embedding(embedding: torch.Tensor, shape: FaceShape, path: Path | str | None) -> torch.Tensor:
    """A ``[1, 512]`` float embedding, or an error naming the file and what it holds."""
    flat = embedding.reshape(1, -1) if embedding.dim() <= 2 and embedding.shape[0] in (1, embedding.numel()) else None
    if flat is None or flat.shape[1] != shape.embedding:
        raise KstoryError(f"the face embedding has shape {tuple(embedding.shape)}, the adapter needs one "
                          f"{shape.embedding}-d insightface antelopev2 embedding", path=path,
                          fix="save FaceAnalysis(name='antelopev2').get(image)[0]['embedding'] with numpy.save, "
                              "or give character.face.image to detect it")
    if not torch.isfinite(flat).all():
        raise KstoryError("the face embedding holds NaN or infinite values", path=path,
                          fix="compute it again with insightface antelopev2")
    return flat.float()


@torch.no_grad()
def face_tokens(projection: FaceProjection, unet: torch.nn.Module, embedding: torch.Tensor,
                features: torch.Tensor) -> torch.Tensor:
    """The frame's face tokens as the cross-attention layers see them: through the UNet's text projection."""
    return unet.text_intermediate_proj(projection(embedding, features))


@torch.no_grad()
def negative_face_tokens(projection: FaceProjection, unet: torch.nn.Module, embedding: torch.Tensor,
                         features: torch.Tensor) -> torch.Tensor:
    """The negative branch: an all-zero embedding and all-zero CLIP features, as the official pipeline does."""
    return face_tokens(projection, unet, torch.zeros_like(embedding), torch.zeros_like(features))
