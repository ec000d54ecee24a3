"""Kolors IP-Adapter-Plus on DiffSynth's Kolors UNet: a character reference for chosen frames.

DiffSynth 1.1.9 has only the SDXL adapter (4 tokens from ViT-bigG), and it
flattens a batch's image tokens into one sequence. Kolors' adapter is
different (a 16-query Resampler on CLIP ViT-L/14-336 hidden states, width
2048), and a story batch holds frames with different references or none, so
this module keeps each frame's tokens its own: the image keys/values of every
cross-attention layer are computed per frame and handed to DiffSynth's
attention through ``lets_dance_xl``'s ``ipadapter_kwargs_list`` with a
per-frame scale (0 for a frame without a reference, which then gets exactly
the attention it gets without the adapter).

The published files load as they are: ``ip_adapter_plus_general.bin`` (a
``{"image_proj": ..., "ip_adapter": ...}`` pickle, read only with
``weights_only=True``) or its flat safetensors form (``image_proj.*``,
``ip_adapter.*``). ``ip_adapter`` keys ``1, 3, ..., 2n-1`` are the UNet's n
cross-attention layers in diffusers' order: down blocks, up blocks, mid block.
``tests/test_story_ip_adapter.py`` checks the noise prediction against
diffusers' ``UNet2DConditionModel`` with the adapter loaded by diffusers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.story.adapter_files import AdapterFiles, AdapterWeights, find_adapter, read_weights

ADAPTER_NAMES = ("ip_adapter_plus_general.safetensors", "ip_adapter_plus_general.bin")
ENCODER_DIR = "image_encoder"
DEFAULT_SCALE = 0.5  # the official Kolors IP-Adapter samples' value
HEAD_DIM = 64  # the Resampler's attention head width (fixed by the published adapters and diffusers' loader)
_FIX = ("use Kwai-Kolors/Kolors-IP-Adapter-Plus: a folder with ip_adapter_plus_general.bin (or its .safetensors "
        "form) and image_encoder/ (CLIP ViT-L/14, 336 px)")


IP_ADAPTER_FILES = AdapterFiles(kind="kolors-ip-adapter-plus", what="IP-Adapter", names=ADAPTER_NAMES,
                                encoder_dir=ENCODER_DIR, fix=_FIX, lone_file=True)
IpAdapterWeights = AdapterWeights  # the IP-Adapter-Plus on disk (kind kolors-ip-adapter-plus)


def identify_ip_adapter(path: Path) -> IpAdapterWeights:
    """Find the adapter file and ``image_encoder/`` in ``path`` (a folder, or the weight file beside the folder)."""
    return find_adapter(path, IP_ADAPTER_FILES)


def read_adapter(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{"image_proj": ..., "ip_adapter": ...}`` from the published pickle or the flat safetensors form."""
    state = read_weights(Path(path), IP_ADAPTER_FILES)
    if not isinstance(state, dict) or not state.get("image_proj") or not state.get("ip_adapter"):
        raise KstoryError("not an IP-Adapter file: it needs image_proj and ip_adapter weights", path=path, fix=_FIX)
    return {part: {k: v for k, v in state[part].items() if isinstance(v, torch.Tensor)}
            for part in ("image_proj", "ip_adapter")}


# --- the Resampler (IP-Adapter-Plus image projection), in the published key layout ---------------------------


class _PerceiverAttention(torch.nn.Module):
    """Latent queries attend to the image features and themselves (keys ``norm1 norm2 to_q to_kv to_out``)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, inner = heads, heads * HEAD_DIM
        self.norm1, self.norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.to_q = torch.nn.Linear(width, inner, bias=False)
        self.to_kv = torch.nn.Linear(width, 2 * inner, bias=False)
        self.to_out = torch.nn.Linear(inner, width, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features, latents = self.norm1(features), self.norm2(latents)
        batch = latents.shape[0]

        def split(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, -1, self.heads, HEAD_DIM).transpose(1, 2)

        key, value = self.to_kv(torch.cat([features, latents], dim=1)).chunk(2, dim=-1)
        out = torch.nn.functional.scaled_dot_product_attention(split(self.to_q(latents)), split(key), split(value))
        return self.to_out(out.transpose(1, 2).reshape(batch, -1, self.heads * HEAD_DIM))


def perceiver_layers(width: int, heads: int, depth: int) -> torch.nn.ModuleList:
    """``depth`` perceiver layers, each attention then a x4 GELU feed-forward (the published ``layers.N.0/1`` keys)."""
    return torch.nn.ModuleList(
        torch.nn.ModuleList([
            _PerceiverAttention(width, heads),
            torch.nn.Sequential(torch.nn.LayerNorm(width), torch.nn.Linear(width, 4 * width, bias=False),
                                torch.nn.GELU(), torch.nn.Linear(4 * width, width, bias=False)),
        ])
        for _ in range(depth)
    )


class Resampler(torch.nn.Module):
    """IP-Adapter-Plus' image projection: ``queries`` learned latents read the CLIP features through ``depth``
    perceiver layers (each followed by a x4 GELU feed-forward), then project to the UNet's cross-attention width."""

    def __init__(self, features: int, width: int, output: int, depth: int, heads: int, queries: int):
        super().__init__()
        self.latents = torch.nn.Parameter(torch.zeros(1, queries, width))
        self.proj_in = torch.nn.Linear(features, width)
        self.proj_out = torch.nn.Linear(width, output)
        self.norm_out = torch.nn.LayerNorm(output)
        self.layers = perceiver_layers(width, heads, depth)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(features.shape[0], 1, 1)
        features = self.proj_in(features)
        for attention, feed_forward in self.layers:
            latents = attention(features, latents) + latents
            latents = feed_forward(latents) + latents
        return self.norm_out(self.proj_out(latents))


@dataclass(frozen=True)
class AdapterShape:
    """The adapter's sizes, read from its tensors."""

    features: int  # CLIP hidden width it reads (1024: ViT-L/14)
    width: int  # Resampler width (2048)
    output: int  # token width = the UNet's cross-attention width (2048)
    depth: int
    heads: int
    tokens: int  # image tokens per frame (16)
    layers: int  # cross-attention layers with image keys/values (70)


def adapter_shape(state: dict[str, dict[str, torch.Tensor]], path: Path) -> AdapterShape:
    """The adapter's sizes; the SDXL adapter (4 tokens, ViT-bigG) and FaceID files are named, not shape-dumped."""
    proj = state["image_proj"]
    if "proj.weight" in proj:
        tokens = proj["proj.weight"].shape[0] // max(1, proj["norm.weight"].shape[0]) if "norm.weight" in proj else 4
        raise KstoryError(
            f"{tokens} image tokens from {proj['proj.weight'].shape[1]}-wide CLIP image embeddings (ViT-bigG): this "
            "is the SDXL IP-Adapter, which does not suit Kolors", path=path, fix=_FIX)
    if "latents" not in proj or "proj_in.weight" not in proj:
        kind = "a FaceID adapter" if "perceiver_resampler.proj_in.weight" in proj or "norm.weight" in proj else \
            "an unknown image projection"
        raise KstoryError(f"image_proj is {kind}, not the IP-Adapter-Plus Resampler", path=path, fix=_FIX)
    depth = len({key.split(".")[1] for key in proj if key.startswith("layers.")})
    layer_keys = sorted(int(key.split(".")[0]) for key in state["ip_adapter"] if key.endswith("to_k_ip.weight"))
    return AdapterShape(
        features=proj["proj_in.weight"].shape[1], width=proj["latents"].shape[2],
        output=proj["proj_out.weight"].shape[0], depth=depth, heads=proj["layers.0.0.to_q.weight"].shape[0] // HEAD_DIM,
        tokens=proj["latents"].shape[1], layers=len(layer_keys),
    )


def load_resampler(state: dict[str, dict[str, torch.Tensor]], path: Path) -> Resampler:
    shape = adapter_shape(state, path)
    model = Resampler(shape.features, shape.width, shape.output, shape.depth, shape.heads, shape.tokens)
    try:
        model.load_state_dict(state["image_proj"], strict=True)
    except RuntimeError as error:
        raise KstoryError(f"image_proj does not have the IP-Adapter-Plus Resampler layout "
                          f"({str(error).splitlines()[1].strip() if len(str(error).splitlines()) > 1 else error})",
                          path=path, fix=_FIX) from error
    return model.eval()


# --- the image keys and values in the UNet's cross-attention ----------------------------------------------------


@dataclass(frozen=True)
class CrossAttentionSite:
    block: int  # index in DiffSynth's ``SDXLUNet.blocks``
    transformer: int  # transformer block inside that AttentionBlock
    width: int  # its inner width (the image keys'/values' width)


def cross_attention_sites(unet: torch.nn.Module) -> list[CrossAttentionSite]:
    """Every cross-attention of DiffSynth's SDXLUNet in the IP-Adapter's order: down blocks, up blocks, mid block.

    DiffSynth keeps one flat block list; the mid block's attention is the one after the last PushBlock and
    before the first PopBlock.
    """
    from diffsynth.models.sd_unet import AttentionBlock, PopBlock, PushBlock

    kinds = [type(block) for block in unet.blocks]
    first_pop = kinds.index(PopBlock)
    last_push = max(i for i, kind in enumerate(kinds[:first_pop]) if kind is PushBlock)
    down, mid, up = [], [], []
    for index, block in enumerate(unet.blocks):
        if not isinstance(block, AttentionBlock):
            continue
        side = up if index > first_pop else mid if index > last_push else down
        side += [CrossAttentionSite(index, t, inner.attn2.to_k.out_features)
                 for t, inner in enumerate(block.transformer_blocks)]
    return down + up + mid


class ImageKeysValues(torch.nn.Module):
    """``to_k_ip`` / ``to_v_ip`` of every cross-attention layer (``ip_adapter`` keys 1, 3, ...)."""

    def __init__(self, sites: list[CrossAttentionSite], token_width: int):
        super().__init__()
        self.sites = sites
        self.to_k_ip = torch.nn.ModuleList(torch.nn.Linear(token_width, s.width, bias=False) for s in sites)
        self.to_v_ip = torch.nn.ModuleList(torch.nn.Linear(token_width, s.width, bias=False) for s in sites)

    def load_published(self, weights: dict[str, torch.Tensor], path: Path) -> ImageKeysValues:
        expected = {f"{2 * i + 1}.{name}.weight" for i in range(len(self.sites)) for name in ("to_k_ip", "to_v_ip")}
        if set(weights) != expected:
            raise KstoryError(
                f"the adapter has image keys/values for {len(weights) // 2} cross-attention layers, this UNet has "
                f"{len(self.sites)}: it belongs to another base model", path=path, fix=_FIX)
        with torch.no_grad():
            for i, site in enumerate(self.sites):
                for name, layers in (("to_k_ip", self.to_k_ip), ("to_v_ip", self.to_v_ip)):
                    tensor = weights[f"{2 * i + 1}.{name}.weight"]
                    if tensor.shape != layers[i].weight.shape:
                        raise KstoryError(
                            f"ip_adapter {2 * i + 1}.{name} is {tuple(tensor.shape)}, the UNet's layer needs "
                            f"{tuple(layers[i].weight.shape)}: it belongs to another base model", path=path, fix=_FIX)
                    layers[i].weight.copy_(tensor)
        return self.eval()

    def kwargs_list(self, tokens: torch.Tensor, scales: torch.Tensor) -> dict[int, dict[int, dict[str, Any]]]:
        """``lets_dance_xl``'s ``ipadapter_kwargs_list``: per site, this batch's image keys/values ``[B, T, C]``
        (each frame its own tokens) and a per-frame scale ``[B, 1, 1, 1]``."""
        out: dict[int, dict[int, dict[str, Any]]] = {}
        for site, to_k, to_v in zip(self.sites, self.to_k_ip, self.to_v_ip):
            out.setdefault(site.block, {})[site.transformer] = {"ip_k": to_k(tokens), "ip_v": to_v(tokens),
                                                                "scale": scales}
        return out


def check_compatible(shape: AdapterShape, encoder_width: int, encoder_layers: int, sites: list[CrossAttentionSite],
                     cross_attention_width: int, path: Path, encoder: Path) -> None:
    """Refuse a wrong image encoder or base model with the mismatch in words, before any shape error could."""
    if encoder_width != shape.features:
        guess = {1024: "CLIP ViT-L/14", 1280: "ViT-H/14", 1664: "ViT-bigG/14"}.get(encoder_width, "another encoder")
        raise KstoryError(
            f"wrong image encoder: it gives {encoder_width}-wide features ({guess}, {encoder_layers} layers), the "
            f"adapter {path.name} reads {shape.features}-wide ones", path=encoder, fix=_FIX)
    if shape.output != cross_attention_width:
        raise KstoryError(f"the adapter makes {shape.output}-wide image tokens, this UNet's cross-attention is "
                          f"{cross_attention_width} wide: it belongs to another base model", path=path, fix=_FIX)
    if shape.layers != len(sites):
        raise KstoryError(f"the adapter has image keys/values for {shape.layers} cross-attention layers, this UNet "
                          f"has {len(sites)}: it belongs to another base model", path=path, fix=_FIX)


def active_scales(scales: Iterable[float], starts: Iterable[float], ends: Iterable[float], step: int,
                  steps: int) -> list[float]:
    """Per-frame scale at ``step``: off before ``start`` and after ``end`` (the ControlNet guides' rule)."""
    return [0.0 if step / steps < start or (step + 1) / steps > end else scale
            for scale, start, end in zip(scales, starts, ends)]
