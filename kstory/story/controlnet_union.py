"""The SDXL ControlNet-Union(-promax) that DiffSynth 1.1.9 runs with Kolors, and a tiny one for tests.

DiffSynth already knows this network (``SDXLControlNetUnion``, which swaps
in the Kolors UNet's own text projection and add-time embedding) and its
diffusers key converter. The real file is built at DiffSynth's full widths;
the tiny one records its widths in the safetensors metadata and is built at
those widths from the same DiffSynth blocks. Both are read through
DiffSynth's converter, so the tiny file exercises the real loading path.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from diffsynth.models.sd_controlnet import ControlNetConditioningLayer
from diffsynth.models.sd_unet import AttentionBlock, DownSampler, PushBlock, ResnetBlock, Timesteps
from diffsynth.models.sdxl_controlnet import ResidualAttentionBlock, SDXLControlNetUnion
from safetensors import safe_open
from safetensors.torch import save_file

from kstory.core.atomic import atomic_path
from kstory.core.errors import KstoryError
from kstory.core.models.tensor_files import read_tensors
from kstory.story.controlnet_kolors import block_key_to_diffusers, load_state_dict_strict

TINY_META = "kstory.tiny_union"  # safetensors metadata key holding the tiny widths
_FIX = "use the unchanged xinsir controlnet-union-sdxl-1.0 diffusion_pytorch_model_promax.safetensors"
# Keys only a Union ControlNet has (diffusers names).
UNION_MARKERS = ("task_embedding", "control_add_embedding.linear_1.weight")
# Guide type -> DiffSynth processor id (it picks the Union task embedding).
TASKS = {"pose": "openpose", "canny": "canny", "depth": "depth"}


@dataclass(frozen=True)
class TinyUnionSpec:
    """Widths of a tiny Union ControlNet matching kstory's tiny Kolors UNet; full values in comments."""

    channels: tuple[int, int, int] = (32, 64, 64)  # (320, 640, 1280)
    head_dim: int = 32  # 64
    transformer_depth: tuple[int, int] = (1, 1)  # (2, 10)
    cross_attention_dim: int = 32  # 2048
    addition_time_embed_dim: int = 16  # 256
    pooled_dim: int = 32  # 1280 (SDXL); unused with Kolors, whose UNet embedding is borrowed
    control_type_dim: int = 16  # 256
    conditioning_channels: tuple[int, ...] = (8, 16, 16, 32)  # (16, 32, 96, 256)
    fuser_heads: int = 2  # 8


def _bare_union() -> SDXLControlNetUnion:
    model = SDXLControlNetUnion.__new__(SDXLControlNetUnion)
    torch.nn.Module.__init__(model)
    return model


def tiny_union(spec: TinyUnionSpec) -> tuple[SDXLControlNetUnion, list[str | None]]:
    """DiffSynth's ``SDXLControlNetUnion`` at tiny widths, plus each block's diffusers prefix."""
    c0, c1, c2 = spec.channels
    temb = 4 * c0
    model = _bare_union()  # its __init__ hard-codes the full widths
    model.time_proj = Timesteps(c0)
    model.time_embedding = torch.nn.Sequential(torch.nn.Linear(c0, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
    model.add_time_proj = Timesteps(spec.addition_time_embed_dim)
    add_in = spec.pooled_dim + 6 * spec.addition_time_embed_dim
    model.add_time_embedding = torch.nn.Sequential(torch.nn.Linear(add_in, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb))
    model.control_type_proj = Timesteps(spec.control_type_dim)
    model.control_type_embedding = torch.nn.Sequential(
        torch.nn.Linear(8 * spec.control_type_dim, temb), torch.nn.SiLU(), torch.nn.Linear(temb, temb)
    )
    model.conv_in = torch.nn.Conv2d(4, c0, kernel_size=3, padding=1)
    model.controlnet_conv_in = ControlNetConditioningLayer(channels=(3, *spec.conditioning_channels, c0))
    model.controlnet_transformer = ResidualAttentionBlock(c0, spec.fuser_heads)
    model.task_embedding = torch.nn.Parameter(torch.empty(8, c0))
    model.spatial_ch_projs = torch.nn.Linear(c0, c0)

    def attention(ch: int, level: int) -> AttentionBlock:
        return AttentionBlock(ch // spec.head_dim, spec.head_dim, ch, spec.transformer_depth[level - 1], spec.cross_attention_dim)

    layout: list[tuple[str | None, torch.nn.Module]] = [
        ("down_blocks.0.resnets.0", ResnetBlock(c0, c0, temb)), (None, PushBlock()),
        ("down_blocks.0.resnets.1", ResnetBlock(c0, c0, temb)), (None, PushBlock()),
        ("down_blocks.0.downsamplers.0", DownSampler(c0)), (None, PushBlock()),
    ]
    ch = c0
    for level, out in ((1, c1), (2, c2)):
        for j in range(2):
            layout += [
                (f"down_blocks.{level}.resnets.{j}", ResnetBlock(ch, out, temb)),
                (f"down_blocks.{level}.attentions.{j}", attention(out, level)),
                (None, PushBlock()),
            ]
            ch = out
        if level == 1:
            layout += [("down_blocks.1.downsamplers.0", DownSampler(ch)), (None, PushBlock())]
    layout += [
        ("mid_block.resnets.0", ResnetBlock(ch, ch, temb)),
        ("mid_block.attentions.0", attention(ch, 2)),
        ("mid_block.resnets.1", ResnetBlock(ch, ch, temb)),
        (None, PushBlock()),
    ]
    model.blocks = torch.nn.ModuleList(block for _, block in layout)
    widths = [c0, c0, c0, c0, c1, c1, c1, c2, c2, c2]
    model.controlnet_blocks = torch.nn.ModuleList(torch.nn.Conv2d(w, w, kernel_size=1) for w in widths)
    model.global_pool = False
    model.task_id = _task_ids()
    return model, [prefix for prefix, _ in layout]


def _task_ids() -> dict[str, int]:
    """DiffSynth's processor id -> Union task index (set in ``SDXLControlNetUnion.__init__``)."""
    return {"openpose": 0, "depth": 1, "softedge": 2, "canny": 3, "lineart": 3, "lineart_anime": 3, "tile": 6, "inpaint": 7}


_TOP = {
    "time_embedding.0": "time_embedding.linear_1",
    "time_embedding.2": "time_embedding.linear_2",
    "add_time_embedding.0": "add_embedding.linear_1",
    "add_time_embedding.2": "add_embedding.linear_2",
    "control_type_embedding.0": "control_add_embedding.linear_1",
    "control_type_embedding.2": "control_add_embedding.linear_2",
}


def union_to_diffusers(model: SDXLControlNetUnion, prefixes: list[str | None]) -> dict[str, torch.Tensor]:
    """The diffusers names the published Union file uses (what DiffSynth's converter reads)."""
    last_conv = len(model.controlnet_conv_in.blocks) - 1
    out = {}
    for key, value in model.state_dict().items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        if module in _TOP:
            name = f"{_TOP[module]}.{leaf}"
        elif parts[0] == "controlnet_conv_in":
            index = int(parts[2])
            inner = "conv_in" if index == 0 else "conv_out" if index == last_conv else f"blocks.{(index - 2) // 2}"
            name = f"controlnet_cond_embedding.{inner}.{leaf}"
        elif parts[0] == "controlnet_transformer":
            name = "transformer_layes.0." + key.removeprefix("controlnet_transformer.")
        elif parts[0] == "controlnet_blocks":
            last = int(parts[1]) == len(model.controlnet_blocks) - 1
            name = f"controlnet_mid_block.{leaf}" if last else f"controlnet_down_blocks.{parts[1]}.{leaf}"
        elif parts[0] == "blocks":
            name = block_key_to_diffusers(prefixes[int(parts[1])], ".".join(parts[2:]), leaf)
        else:
            name = key
        out[name] = value.detach().contiguous()
    return out


def is_union_file(path: Path) -> bool:
    """True for a safetensors file with the Union-only keys."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = set(handle.keys())
    except Exception:  # not safetensors at all: not ours to judge here
        return False
    return all(marker in keys for marker in UNION_MARKERS)


def load_union_controlnet(path: Path, device: str = "cpu", torch_dtype: torch.dtype = torch.float32) -> SDXLControlNetUnion:
    """Load a Union ControlNet file (real or tiny) through DiffSynth's diffusers converter."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
        state = read_tensors(path, torch_dtype)  # converted as read: one copy of the weights, never two
    except Exception as error:  # safetensors raises its own error type for corrupt files
        raise KstoryError(f"unreadable ControlNet weights ({error})", path=path, fix=_FIX) from error
    if TINY_META in metadata:
        spec = TinyUnionSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(metadata[TINY_META]).items()})
        with torch.device("meta"):
            model, _ = tiny_union(spec)
    else:
        with torch.device("meta"):
            model = SDXLControlNetUnion()
    converted = SDXLControlNetUnion.state_dict_converter().from_diffusers(state)
    load_state_dict_strict(model, converted, path, fix=_FIX)
    return model.to(device=device, dtype=torch_dtype).eval()


def save_tiny_union(path: Path, model: SDXLControlNetUnion, prefixes: list[str | None], spec: TinyUnionSpec) -> Path:
    """Write a tiny Union ControlNet in the published diffusers key format, its widths in the metadata."""
    metadata = {"format": "pt", TINY_META: json.dumps(asdict(spec))}
    with atomic_path(path) as tmp:
        save_file(union_to_diffusers(model, prefixes), str(tmp), metadata=metadata)
    return Path(path)
