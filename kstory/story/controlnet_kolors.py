"""The official Kwai-Kolors ControlNets (Canny, Pose, Depth) inside DiffSynth's Kolors pipeline.

Those checkpoints are diffusers ``ControlNetModel`` folders (config.json +
diffusion_pytorch_model.safetensors) with an ``encoder_hid_proj`` that maps
the raw ChatGLM states to the UNet's cross-attention width. DiffSynth 1.1.9
has no class for them: its only SDXL ControlNet is the Union one, which
borrows the Kolors UNet's projection instead of carrying its own. This module
rebuilds the network from DiffSynth's own blocks (so it runs in
``lets_dance_xl`` next to the UNet), reads the diffusers config to size it,
and renames the diffusers keys onto it. ``tests/test_story_controlnet.py``
checks the residuals against diffusers' ``ControlNetModel``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffsynth.models.sd_controlnet import ControlNetConditioningLayer
from diffsynth.models.sd_unet import AttentionBlock, DownSampler, PushBlock, ResnetBlock, Timesteps

from kstory.core.errors import KstoryError
from kstory.core.models.tensor_files import read_tensors

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
# diffusers' Transformer2DModel normalises with 1e-6; DiffSynth's AttentionBlock defaults to 1e-5.
_ATTENTION_EPS = 1e-6
_LAYOUT_FIX = (
    "use an unchanged Kwai-Kolors/Kolors-ControlNet-{Canny,Pose,Depth} folder "
    "(config.json + diffusion_pytorch_model.safetensors)"
)
# Config values the port implements; anything else is a layout it would silently get wrong.
_REQUIRED_VALUES: dict[str, tuple[Any, ...]] = {
    "_class_name": ("ControlNetModel",),
    "encoder_hid_dim_type": ("text_proj",),
    "addition_embed_type": ("text_time",),
    "in_channels": (4,),
    "act_fn": ("silu",),
    "flip_sin_to_cos": (True,),
    "freq_shift": (0,),
    "downsample_padding": (1,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "mid_block_scale_factor": (1, 1.0),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "upcast_attention": (False, None),
    "only_cross_attention": (False,),
    "controlnet_conditioning_channel_order": ("rgb", "bgr"),
}


@dataclass(frozen=True)
class KolorsControlNetConfig:
    """The part of a diffusers ``ControlNetModel`` config that shapes a Kolors ControlNet."""

    block_out_channels: tuple[int, ...]
    down_block_types: tuple[str, ...]
    layers_per_block: int
    heads: tuple[int, ...]  # diffusers calls this attention_head_dim; it is the head count
    transformer_layers: tuple[int, ...]
    cross_attention_dim: int
    encoder_hid_dim: int
    addition_time_embed_dim: int
    projection_class_embeddings_input_dim: int
    conditioning_channels: int
    conditioning_embedding_out_channels: tuple[int, ...]
    norm_num_groups: int
    norm_eps: float
    use_linear_projection: bool
    bgr: bool
    global_pool: bool

    @classmethod
    def from_diffusers(cls, config: dict[str, Any], path: Path | None = None) -> KolorsControlNetConfig:
        """Validate a config.json; a field outside what the port implements is a KstoryError."""
        for key, allowed in _REQUIRED_VALUES.items():
            default = None if key == "_class_name" else allowed[0]
            if key == "encoder_hid_dim_type" and config.get("encoder_hid_dim") is None:
                default = None  # diffusers infers text_proj only when encoder_hid_dim is set
            value = config.get(key, default)
            if isinstance(value, list):  # only_cross_attention may be per block
                value = value[0] if len(set(map(str, value))) == 1 else value
            if value not in allowed:
                raise KstoryError(
                    f"unknown ControlNet layout: config.json has {key}={value!r} (supported: {list(allowed)})",
                    path=path, fix=_LAYOUT_FIX,
                )
        try:
            channels = tuple(int(c) for c in config["block_out_channels"])
            levels = len(channels)
            heads = config.get("num_attention_heads") or config["attention_head_dim"]
            layers = config.get("transformer_layers_per_block", 1)
            down_types = tuple(config["down_block_types"])
            result = cls(
                block_out_channels=channels,
                down_block_types=down_types,
                layers_per_block=int(config.get("layers_per_block", 2)),
                heads=tuple(heads) if isinstance(heads, list) else (int(heads),) * levels,
                transformer_layers=tuple(layers) if isinstance(layers, list) else (int(layers),) * levels,
                cross_attention_dim=int(config["cross_attention_dim"]),
                encoder_hid_dim=int(config["encoder_hid_dim"]),
                addition_time_embed_dim=int(config["addition_time_embed_dim"]),
                projection_class_embeddings_input_dim=int(config["projection_class_embeddings_input_dim"]),
                conditioning_channels=int(config.get("conditioning_channels", 3)),
                conditioning_embedding_out_channels=tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))),
                norm_num_groups=int(config.get("norm_num_groups", 32)),
                norm_eps=float(config.get("norm_eps", 1e-5)),
                use_linear_projection=bool(config.get("use_linear_projection", False)),
                bgr=config.get("controlnet_conditioning_channel_order", "rgb") == "bgr",
                global_pool=bool(config.get("global_pool_conditions", False)),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise KstoryError(f"unknown ControlNet layout: config.json lacks or mangles {error}", path=path,
                              fix=_LAYOUT_FIX) from error
        known = {"DownBlock2D", "CrossAttnDownBlock2D"}
        if len(down_types) != levels or not set(down_types) <= known or any(
            len(t) != levels for t in (result.heads, result.transformer_layers)
        ):
            raise KstoryError(f"unknown ControlNet layout: down blocks {list(down_types)}", path=path, fix=_LAYOUT_FIX)
        return result

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json that diffusers' ``ControlNetModel`` (and :meth:`from_diffusers`) accepts."""
        return {
            "_class_name": "ControlNetModel",
            "act_fn": "silu",
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": self.addition_time_embed_dim,
            "attention_head_dim": list(self.heads),
            "block_out_channels": list(self.block_out_channels),
            "class_embed_type": None,
            "conditioning_channels": self.conditioning_channels,
            "conditioning_embedding_out_channels": list(self.conditioning_embedding_out_channels),
            "controlnet_conditioning_channel_order": "bgr" if self.bgr else "rgb",
            "cross_attention_dim": self.cross_attention_dim,
            "down_block_types": list(self.down_block_types),
            "downsample_padding": 1,
            "encoder_hid_dim": self.encoder_hid_dim,
            "encoder_hid_dim_type": "text_proj",
            "flip_sin_to_cos": True,
            "freq_shift": 0,
            "global_pool_conditions": self.global_pool,
            "in_channels": 4,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "norm_eps": self.norm_eps,
            "norm_num_groups": self.norm_num_groups,
            "num_attention_heads": None,
            "num_class_embeds": None,
            "only_cross_attention": False,
            "projection_class_embeddings_input_dim": self.projection_class_embeddings_input_dim,
            "resnet_time_scale_shift": "default",
            "transformer_layers_per_block": list(self.transformer_layers),
            "upcast_attention": False,
            "use_linear_projection": self.use_linear_projection,
        }


class KolorsControlNet(torch.nn.Module):
    """A Kolors ControlNet made of DiffSynth blocks; ``forward`` returns the UNet residual stack.

    The call signature is the one ``MultiControlNetManager`` uses for
    DiffSynth's ControlNets, so both kinds run through the same manager.
    """

    def __init__(self, config: KolorsControlNetConfig):
        super().__init__()
        self.config = config
        c0 = config.block_out_channels[0]
        temb = 4 * c0
        self.time_proj = Timesteps(c0)
        self.time_embedding = torch.nn.Sequential(torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
        self.add_time_proj = Timesteps(config.addition_time_embed_dim)
        self.add_time_embedding = torch.nn.Sequential(
            torch.nn.Linear(config.projection_class_embeddings_input_dim, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb)
        )
        self.encoder_hid_proj = torch.nn.Linear(config.encoder_hid_dim, config.cross_attention_dim)
        self.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
        self.controlnet_conv_in = ControlNetConditioningLayer(
            channels=(config.conditioning_channels, *config.conditioning_embedding_out_channels, c0)
        )
        layout = _layout(config)
        self.diffusers_prefixes = [prefix for prefix, _ in layout]
        self.blocks = torch.nn.ModuleList(block for _, block in layout)
        widths = _residual_widths(config)
        self.controlnet_blocks = torch.nn.ModuleList(torch.nn.Conv2d(w, w, kernel_size=1) for w in widths)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        conditioning: torch.Tensor, add_time_id: torch.Tensor, add_text_embeds: torch.Tensor, **kwargs: Any,
    ) -> list[torch.Tensor]:
        if self.config.bgr:
            conditioning = torch.flip(conditioning, dims=[1])
        text_emb = self.encoder_hid_proj(encoder_hidden_states)
        time_emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        time_ids = self.add_time_proj(add_time_id).reshape((add_text_embeds.shape[0], -1))
        add_embeds = torch.concat([add_text_embeds, time_ids], dim=-1).to(sample.dtype)
        time_emb = time_emb + self.add_time_embedding(add_embeds)
        hidden_states = self.conv_in(sample) + self.controlnet_conv_in(conditioning)
        res_stack = [hidden_states]
        for block in self.blocks:
            hidden_states, time_emb, text_emb, res_stack = block(hidden_states, time_emb, text_emb, res_stack)
        residuals = [conv(res) for conv, res in zip(self.controlnet_blocks, res_stack)]
        if self.config.global_pool:
            residuals = [res.mean(dim=(2, 3), keepdim=True) for res in residuals]
        return residuals


def _layout(config: KolorsControlNetConfig) -> list[tuple[str | None, torch.nn.Module]]:
    """DiffSynth blocks in call order, each with the diffusers prefix its weights come from."""
    groups, eps, temb = config.norm_num_groups, config.norm_eps, 4 * config.block_out_channels[0]

    def attention(ch: int, level: int) -> AttentionBlock:
        heads = config.heads[level]
        return AttentionBlock(heads, ch // heads, ch, config.transformer_layers[level], config.cross_attention_dim,
                              norm_num_groups=groups, eps=_ATTENTION_EPS)

    layout: list[tuple[str | None, torch.nn.Module]] = []
    ch, last = config.block_out_channels[0], len(config.block_out_channels) - 1
    for level, out in enumerate(config.block_out_channels):
        for j in range(config.layers_per_block):
            layout.append((f"down_blocks.{level}.resnets.{j}", ResnetBlock(ch, out, temb, groups=groups, eps=eps)))
            ch = out
            if config.down_block_types[level] == "CrossAttnDownBlock2D":
                layout.append((f"down_blocks.{level}.attentions.{j}", attention(ch, level)))
            layout.append((None, PushBlock()))
        if level < last:
            layout += [(f"down_blocks.{level}.downsamplers.0", DownSampler(ch)), (None, PushBlock())]
    layout += [
        ("mid_block.resnets.0", ResnetBlock(ch, ch, temb, groups=groups, eps=eps)),
        ("mid_block.attentions.0", attention(ch, last)),
        ("mid_block.resnets.1", ResnetBlock(ch, ch, temb, groups=groups, eps=eps)),
        (None, PushBlock()),
    ]
    return layout


def _residual_widths(config: KolorsControlNetConfig) -> list[int]:
    channels = config.block_out_channels
    widths = [channels[0]]
    for level, out in enumerate(channels):
        widths += [out] * config.layers_per_block + ([out] if level < len(channels) - 1 else [])
    return [*widths, channels[-1]]


# --- diffusers keys <-> DiffSynth keys -----------------------------------------

_TOP = {
    "time_embedding.linear_1": "time_embedding.0",
    "time_embedding.linear_2": "time_embedding.2",
    "add_embedding.linear_1": "add_time_embedding.0",
    "add_embedding.linear_2": "add_time_embedding.2",
    "controlnet_cond_embedding.conv_in": "controlnet_conv_in.blocks.0",
}
_PARTS = {".to_out.0.": ".to_out.", ".ff.net.0.": ".act_fn.", ".ff.net.2.": ".ff."}
_PARTS_INVERSE = {v: k for k, v in _PARTS.items()}
# One pass, so a renamed part is never renamed again (".act_fn." -> ".ff.net.0." must not hit ".ff.").
_TO_DIFFUSERS = re.compile("|".join(re.escape(part) for part in _PARTS_INVERSE))
_TO_DIFFSYNTH = re.compile("|".join(re.escape(part) for part in _PARTS))


def block_key_to_diffusers(prefix: str | None, inner: str, leaf: str) -> str:
    """diffusers name of parameter ``inner.leaf`` of the DiffSynth block that came from ``prefix``."""
    rest = _TO_DIFFUSERS.sub(lambda match: _PARTS_INVERSE[match.group(0)], f".{inner}." if inner else ".")
    return f"{prefix}{rest}{leaf}"


def diffusers_to_diffsynth(model: KolorsControlNet, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict onto ``model``; unknown keys keep their name."""
    blocks = {prefix: index for index, prefix in enumerate(model.diffusers_prefixes) if prefix}
    n_cond = 2 * (len(model.config.conditioning_embedding_out_channels) - 1)  # diffusers convs before conv_out
    n_down = len(model.controlnet_blocks) - 1
    out = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        name = key
        if module in _TOP:
            name = f"{_TOP[module]}.{leaf}"
        elif module == "controlnet_cond_embedding.conv_out":
            name = f"controlnet_conv_in.blocks.{2 * n_cond + 2}.{leaf}"
        elif parts[0] == "controlnet_cond_embedding" and len(parts) == 3:
            name = f"controlnet_conv_in.blocks.{2 * int(parts[2]) + 2}.{leaf}"
        elif parts[0] == "controlnet_down_blocks":
            name = f"controlnet_blocks.{parts[1]}.{leaf}"
        elif module == "controlnet_mid_block":
            name = f"controlnet_blocks.{n_down}.{leaf}"
        elif parts[0] in ("down_blocks", "mid_block"):
            size = 4 if parts[0] == "down_blocks" else 3
            prefix, rest = ".".join(parts[:size]), "." + ".".join(parts[size:]) + "."
            if prefix in blocks:
                rest = _TO_DIFFSYNTH.sub(lambda match: _PARTS[match.group(0)], rest)
                name = f"blocks.{blocks[prefix]}{rest}{leaf}"
                if (".proj_in." in name or ".proj_out." in name) and value.dim() == 4:
                    value = value[:, :, 0, 0]  # 1x1 conv projection (use_linear_projection: false)
        out[name] = value
    return out


def diffsynth_to_diffusers(model: KolorsControlNet) -> dict[str, torch.Tensor]:
    """``model``'s weights under diffusers names: how the tiny test ControlNet is written."""
    inverse = {v: k for k, v in _TOP.items()}
    n_cond = 2 * (len(model.config.conditioning_embedding_out_channels) - 1)  # diffusers convs before conv_out
    n_down = len(model.controlnet_blocks) - 1
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        if module in inverse:
            name = f"{inverse[module]}.{leaf}"
        elif parts[0] == "controlnet_conv_in":
            index = int(parts[2])
            inner = "conv_out" if index == 2 * n_cond + 2 else f"blocks.{(index - 2) // 2}"
            name = f"controlnet_cond_embedding.{inner}.{leaf}"
        elif parts[0] == "controlnet_blocks":
            name = f"controlnet_mid_block.{leaf}" if int(parts[1]) == n_down else f"controlnet_down_blocks.{parts[1]}.{leaf}"
        elif parts[0] == "blocks":
            name = block_key_to_diffusers(model.diffusers_prefixes[int(parts[1])], ".".join(parts[2:]), leaf)
            if not model.config.use_linear_projection and (".proj_in." in name or ".proj_out." in name):
                value = value[:, :, None, None]
        else:
            name = key
        out[name] = value.detach().contiguous()
    return out


def load_state_dict_strict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path, fix: str = _LAYOUT_FIX
) -> None:
    """``load_state_dict(assign=True)`` (``model`` may be on the meta device) that reports a mismatch as an
    unknown layout, naming a few keys."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        details = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if keys
        )
        raise KstoryError(f"unknown ControlNet layout ({details})", path=path, fix=fix)
    model.load_state_dict(state_dict, assign=True)  # the file's tensors become the weights: no second copy


def load_kolors_controlnet(
    folder: Path, device: str = "cpu", torch_dtype: torch.dtype = torch.float32
) -> KolorsControlNet:
    """Load a diffusers-format Kolors ControlNet folder into the DiffSynth port."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise KstoryError("missing file of a Kolors ControlNet folder", path=path, fix=_LAYOUT_FIX)
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise KstoryError(f"unreadable config.json ({error})", path=config_path, fix=_LAYOUT_FIX) from error
    config = KolorsControlNetConfig.from_diffusers(raw, config_path)
    with torch.device("meta"):
        model = KolorsControlNet(config)
    try:
        state = read_tensors(weights_path, torch_dtype)  # converted as read: one copy of the weights, never two
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise KstoryError(f"unreadable ControlNet weights ({error})", path=weights_path, fix=_LAYOUT_FIX) from error
    load_state_dict_strict(model, diffusers_to_diffsynth(model, state), weights_path)
    return model.to(device=device, dtype=torch_dtype).eval()
