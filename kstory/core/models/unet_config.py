"""The Kolors UNet's diffusers ``config.json``, both ways: from kstory's widths, and back to them.

DiffSynth's ``SDXLUNet`` has no config (its widths are hard-coded); kstory's
builder (``kstory.core.models.tiny.tiny_unet``) makes the same network at any
widths. A diffusers UNet folder (Kolors-Inpainting's, or a tiny one) says its
widths in ``config.json``, so reading them back lets one builder serve the
full-size and the tiny model alike, with nothing allocated at full size twice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.models.tiny import TinyKolorsSpec

# What DiffSynth's SDXLUNet (and so kstory's builder) is: the Kolors / SDXL block topology.
_TOPOLOGY = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "layers_per_block": 2,
    "encoder_hid_dim_type": "text_proj",
    "addition_embed_type": "text_time",
}


def diffusers_unet_config(spec: TinyKolorsSpec, in_channels: int = 4) -> dict[str, Any]:
    """A diffusers ``UNet2DConditionModel`` config with ``spec``'s widths and Kolors' conditioning."""
    channels = tuple(spec.unet_channels)
    heads = tuple(ch // spec.unet_head_dim for ch in channels)  # diffusers' legacy "attention_head_dim" = heads
    depth = (1, *spec.unet_transformer_depth)
    return {
        "sample_size": 16, "in_channels": in_channels, "out_channels": 4, "center_input_sample": False,
        "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": tuple(_TOPOLOGY["down_block_types"]), "mid_block_type": _TOPOLOGY["mid_block_type"],
        "up_block_types": tuple(_TOPOLOGY["up_block_types"]),
        "block_out_channels": channels, "layers_per_block": 2, "norm_num_groups": 32,
        "cross_attention_dim": spec.cross_attention_dim, "transformer_layers_per_block": depth,
        "attention_head_dim": heads, "use_linear_projection": True,
        "encoder_hid_dim": spec.text_hidden_size, "encoder_hid_dim_type": "text_proj",
        "addition_embed_type": "text_time", "addition_time_embed_dim": spec.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": spec.text_hidden_size + 6 * spec.addition_time_embed_dim,
    }


def unet_spec_from_config(config: dict[str, Any], path: Path) -> TinyKolorsSpec:
    """The widths of the Kolors UNet ``config`` (read from ``path``) as a spec for kstory's builder.

    Anything that is not the Kolors topology is refused naming the setting, since the builder would make
    another network than the file describes.
    """
    fix = "use the published Kolors (or Kolors-Inpainting) unet/config.json unchanged"
    for key, expected in _TOPOLOGY.items():
        value = config.get(key)
        if (list(value) if isinstance(value, (list, tuple)) else value) != expected:
            raise KstoryError(f"not a Kolors UNet config: {key} is {value!r}, Kolors has {expected!r}", path=path, fix=fix)
    try:
        channels = tuple(int(c) for c in config["block_out_channels"])
        heads = config["attention_head_dim"]
        heads = [int(h) for h in heads] if isinstance(heads, (list, tuple)) else [int(heads)] * len(channels)
        depth = [int(d) for d in config["transformer_layers_per_block"]]
        head_dims = {c // h for c, h in zip(channels, heads)}
        spec = replace(
            TinyKolorsSpec(), unet_channels=channels, unet_head_dim=head_dims.pop(),
            unet_transformer_depth=(depth[1], depth[2]), cross_attention_dim=int(config["cross_attention_dim"]),
            addition_time_embed_dim=int(config["addition_time_embed_dim"]),
            text_hidden_size=int(config["encoder_hid_dim"]),
        )
    except (KeyError, TypeError, ValueError, IndexError) as error:
        raise KstoryError(f"unreadable Kolors UNet config ({type(error).__name__}: {error})", path=path, fix=fix) from error
    if head_dims or len(channels) != 3 or depth[0] != 1:
        raise KstoryError("not a Kolors UNet config: its levels have different head widths or depths than Kolors'",
                          path=path, fix=fix)
    return spec
