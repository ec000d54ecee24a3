"""The names of Kolors' UNet modules in the three spellings LoRA files use.

DiffSynth numbers the UNet's blocks in one flat list (``blocks.<i>``);
diffusers names them by level (``down_blocks.1.attentions.0``); the original
SGM/LDM checkpoints that kohya sd-scripts follow name them by input/output
block (``input_blocks.4.1``). Kolors keeps SDXL's topology (three levels, two
resnets per down level and three per up level, attention on levels 1 and 2),
and the tiny test model keeps it too, so one walk of that topology gives every
spelling. LoRA export (DiffSynth -> diffusers/kohya) and LoRA import (any ->
DiffSynth) both read these tables, so the two directions cannot drift apart.
"""

from __future__ import annotations

from typing import Any

LAYERS_PER_BLOCK = 2  # resnets per down level (an up level has one more)
ATTENTION_LEVELS = (1, 2)
LEVELS = 3

# DiffSynth's top-level module names -> diffusers'.
_TOP_TO_DIFFUSERS = {
    "time_embedding.0": "time_embedding.linear_1",
    "time_embedding.2": "time_embedding.linear_2",
    "add_time_embedding.0": "add_embedding.linear_1",
    "add_time_embedding.2": "add_embedding.linear_2",
    "text_intermediate_proj": "encoder_hid_proj",
    "conv_in": "conv_in",
    "conv_out": "conv_out",
    "conv_norm_out": "conv_norm_out",
}
# Inside a block, DiffSynth's part names -> diffusers' (the rest is spelled alike).
_PARTS_TO_DIFFUSERS = {"to_out": "to_out.0", "act_fn": "ff.net.0", "ff": "ff.net.2"}
# diffusers' top-level names -> SGM's (encoder_hid_proj is Kolors' own and has no SGM name).
_TOP_TO_SGM = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# A resnet's layers in diffusers' spelling -> SGM's.
_RESNET_TO_SGM = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}


def sdxl_block_prefixes(levels: int = LEVELS, attention_levels: tuple[int, ...] = ATTENTION_LEVELS) -> list[str | None]:
    """Diffusers prefix of each entry of DiffSynth's ``SDXLUNet.blocks`` (None for push/pop blocks).

    Walks the SDXL topology in DiffSynth's order: per down level two
    (resnet, [attention], push) groups and a downsampler + push except on the
    last level; the mid block; per up level three (pop, resnet, [attention])
    groups and an upsampler except on the last level.
    """
    out: list[str | None] = []
    for level in range(levels):
        for j in range(LAYERS_PER_BLOCK):
            out.append(f"down_blocks.{level}.resnets.{j}")
            if level in attention_levels:
                out.append(f"down_blocks.{level}.attentions.{j}")
            out.append(None)
        if level < levels - 1:
            out += [f"down_blocks.{level}.downsamplers.0", None]
    out += ["mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1"]
    for i in range(levels):
        level = levels - 1 - i
        for j in range(LAYERS_PER_BLOCK + 1):
            out += [None, f"up_blocks.{i}.resnets.{j}"]
            if level in attention_levels:
                out.append(f"up_blocks.{i}.attentions.{j}")
        if level > 0:
            out.append(f"up_blocks.{i}.upsamplers.0")
    return out


_PREFIXES = sdxl_block_prefixes()


def diffusers_module(diffsynth: str) -> str | None:
    """The diffusers name of a DiffSynth ``SDXLUNet`` module (None when it has none)."""
    if not diffsynth.startswith("blocks."):
        return _TOP_TO_DIFFUSERS.get(diffsynth)
    _, index, *rest = diffsynth.split(".")
    prefix = _PREFIXES[int(index)] if int(index) < len(_PREFIXES) else None
    if prefix is None or not rest:
        return None
    return ".".join([prefix, *(_PARTS_TO_DIFFUSERS.get(part, part) for part in rest)])


def sgm_module(diffusers: str) -> str | None:
    """The SGM (original checkpoint, kohya sd-scripts) name of a diffusers UNet module, or None."""
    if diffusers in _TOP_TO_SGM:
        return _TOP_TO_SGM[diffusers]
    parts = diffusers.split(".")
    if parts[0] == "mid_block" and len(parts) > 3:
        slot = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}.get((parts[1], parts[2]))
        return None if slot is None else _inner(f"middle_block.{slot}", parts[1], parts[3:])
    if parts[0] not in ("down_blocks", "up_blocks") or len(parts) < 5:
        return None
    level, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
    per_level = LAYERS_PER_BLOCK + 1
    if parts[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks.{per_level * (level + 1)}.0.op" if rest == ["conv"] else None
        slot = {"resnets": 0, "attentions": 1}.get(kind)
        return None if slot is None else _inner(f"input_blocks.{per_level * level + j + 1}.{slot}", kind, rest)
    depth = LEVELS - 1 - level  # up_blocks.0 is the deepest level
    if kind == "upsamplers":
        slot = 2 if depth in ATTENTION_LEVELS else 1
        return f"output_blocks.{per_level * level + LAYERS_PER_BLOCK}.{slot}.conv" if rest == ["conv"] else None
    slot = {"resnets": 0, "attentions": 1}.get(kind)
    return None if slot is None else _inner(f"output_blocks.{per_level * level + j}.{slot}", kind, rest)


def _inner(block: str, kind: str, rest: list[str]) -> str | None:
    if kind == "resnets":
        return f"{block}.{_RESNET_TO_SGM[rest[0]]}" if len(rest) == 1 and rest[0] in _RESNET_TO_SGM else None
    return ".".join([block, *rest])


def module_spellings(unet: Any) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every spelling of every Linear/Conv2d module of a DiffSynth UNet -> (DiffSynth name, weight shape).

    The spellings: DiffSynth's dotted name, diffusers' dotted name, and the
    kohya-flattened (``.`` -> ``_``) diffusers and SGM names. Flattening is
    not reversible (``transformer_blocks`` holds an underscore), so names are
    matched by flattening the model's own names, never by unflattening a file's.
    """
    import torch

    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        entry = (name, tuple(module.weight.shape))
        out[name] = entry
        diffusers = diffusers_module(name)
        if diffusers is None:
            continue
        out[diffusers] = entry
        out[diffusers.replace(".", "_")] = entry
        sgm = sgm_module(diffusers)
        if sgm is not None:
            out[sgm] = entry
            out[sgm.replace(".", "_")] = entry
    return out
