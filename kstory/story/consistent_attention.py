"""Consistent self-attention across frames: StoryDiffusion's training-free idea on DiffSynth's SDXL UNet.

In the chosen self-attention layers, a frame's keys and values are its own
tokens followed by a sampled share of each identity frame's tokens, so the
frames draw the character from one shared pool. Identity frames are denoised
first; at each step and layer they write their sampled tokens to a *bank* that
later batches read, so the story need not be one batch and memory grows with
the identity frames, not the story.

It is deterministic: which tokens an identity frame lends at a step and layer
is drawn from a ``torch.Generator`` seeded by that frame's seed, the step and the
layer name, so a re-run (a re-roll) gives the same pixels bit for bit. Each CFG
half attends within itself: positive prompts to the positive half's tokens,
negative to the negative half's.

The hook is a forward pre-hook on DiffSynth's ``attn1`` that only supplies
``encoder_hidden_states`` (the key/value input), so DiffSynth's own attention
runs unchanged; with no frame sharing, nothing is installed at all.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from diffsynth.models.sd_unet import AttentionBlock, DownSampler, PopBlock, UpSampler

IDENTITY, READER = "identity", "reader"


@dataclass(frozen=True)
class SharingSettings:
    """What decides the sharing (hashed into frame keys and recorded in the manifest)."""

    share: float
    layers: tuple[str, ...]
    start_step: int
    end_step: int | None
    identity_frames: tuple[int, ...]
    readers: tuple[int, ...]

    @classmethod
    def from_spec(cls, spec: Any) -> SharingSettings | None:
        """The spec's settings with its defaults filled in; None when consistent attention is off."""
        from kstory.story.consistent_spec import sharing_frames

        section = spec.generation.consistent_attention
        if section is None:
            return None
        identity, readers = sharing_frames(spec)
        return cls(section.share, tuple(section.layers), section.start_step, section.end_step,
                   tuple(sorted(identity)), tuple(sorted(readers)))

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SharingSettings:
        """Back from a manifest frame entry's ``consistent_attention``."""
        return cls(float(record["share"]), tuple(record["layers"]), int(record["start_step"]),
                   None if record.get("end_step") is None else int(record["end_step"]),
                   tuple(record["identity_frames"]), tuple(record["readers"]))

    def role(self, index: int) -> str | None:
        if index in self.identity_frames:
            return IDENTITY
        return READER if index in self.readers else None

    def record(self, index: int) -> dict[str, Any] | None:
        """A frame's manifest entry: the settings, its role and the frames whose tokens it attended to."""
        role = self.role(index)
        if role is None:
            return None
        return {"share": self.share, "layers": list(self.layers), "start_step": self.start_step,
                "end_step": self.end_step, "identity_frames": list(self.identity_frames),
                "readers": list(self.readers), "role": role,
                "bank": [i for i in self.identity_frames if i != index]}

    def active(self, step: int) -> bool:
        return step >= self.start_step and (self.end_step is None or step < self.end_step)


def split_by_role(plans: Sequence[Any], settings: SharingSettings | None) -> list[list[Any]]:
    """Identity frames first (they fill the bank), then readers, then frames without sharing.

    Batches are formed within each part, so a batch is never mixed; with sharing off it is one part, the story.
    """
    if settings is None:
        return [list(plans)]
    parts = [[p for p in plans if settings.role(p.index) == role] for role in (IDENTITY, READER, None)]
    return [part for part in parts if part]


def sharing_key(base_key: str, index: int, settings: SharingSettings | None, identity_keys: dict[int, str]) -> str:
    """A frame's key with its sharing: the settings' content and the keys of the frames that fed the bank."""
    record = settings.record(index) if settings else None
    if record is None:
        return base_key
    data = {"key": base_key, "consistent_attention": record,
            "bank": {str(i): identity_keys[i] for i in settings.identity_frames}}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def with_bank(groups: list[list[Any]], wanted: set[int], settings: SharingSettings | None) -> list[list[Any]]:
    """The batches to run for ``wanted``: theirs, and every identity batch when one of them shares."""
    needs_bank = settings is not None and any(settings.role(i) for i in wanted)
    return [batch for batch in groups
            if any(p.index in wanted for p in batch)
            or (needs_bank and any(settings.role(p.index) == IDENTITY for p in batch))]


def bank_batches(frame: int, settings: SharingSettings | None, records: dict[str, Any],
                 where: Any) -> list[list[int]]:
    """For a re-roll: the identity batches (from the manifest) to run before ``frame``'s own batch.

    An identity frame cannot be re-rolled alone: every frame reading its bank would change too.
    """
    from kstory.core.errors import KstoryError

    if settings is None:
        return []
    if settings.role(frame) == IDENTITY:
        raise KstoryError(
            f"frame {frame} is an identity frame of consistent attention: frames "
            f"{', '.join(map(str, settings.readers)) or 'none'} read its tokens, so re-rolling it alone would leave "
            "them made from a bank that no longer exists", path=where,
            fix="change its seed or prompt in the story spec and run `kstory story` (the frames reading it are "
                "made again too), or re-roll a frame that only reads the bank")
    missing = [i for i in settings.identity_frames if str(i) not in records]
    if missing:
        raise KstoryError(f"identity frame(s) {', '.join(map(str, missing))} of consistent attention are not in "
                          "the manifest", path=where, fix="generate the whole story again")
    batches: list[list[int]] = []
    for i in settings.identity_frames:
        batch = list(records[str(i)].get("batch", [i]))
        if batch not in batches:
            batches.append(batch)
    return batches


def attention_layers(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """Every self-attention (``attn1``) of the UNet, named ``section.level.block.layer`` (e.g. ``up.0.2.7``).

    Sections are down, mid and up; a level is one resolution (``up.0`` is the first, coarsest up level).
    """
    blocks = list(unet.blocks)
    first_pop = next(i for i, b in enumerate(blocks) if isinstance(b, PopBlock))
    attention = [i for i, b in enumerate(blocks) if isinstance(b, AttentionBlock)]
    mid = max(i for i in attention if i < first_pop)
    names: list[tuple[str, torch.nn.Module]] = []
    level = {"down": -1, "up": -1}
    counter = {"down": 0, "up": 0}
    crossed = {"down": True, "up": True}
    for i, block in enumerate(blocks):
        if isinstance(block, (DownSampler, UpSampler)):
            crossed["down" if isinstance(block, DownSampler) else "up"] = True
        if not isinstance(block, AttentionBlock):
            continue
        if i == mid:
            prefix = "mid.0.0"
        else:
            section = "down" if i < first_pop else "up"
            if crossed[section]:
                level[section], counter[section], crossed[section] = level[section] + 1, 0, False
            prefix = f"{section}.{level[section]}.{counter[section]}"
            counter[section] += 1
        names += [(f"{prefix}.{t}", layer.attn1) for t, layer in enumerate(block.transformer_blocks)]
    return names


def selected(name: str, layers: Sequence[str]) -> bool:
    return any(name == group or name.startswith(group + ".") for group in layers)


def _generator_seed(seed: int, step: int, layer: str) -> int:
    digest = hashlib.sha256(f"{seed}/{step}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def lent_tokens(count: int, share: float, seed: int, step: int, layer: str) -> torch.Tensor:
    """Which of an identity frame's ``count`` tokens it lends at this step and layer (sorted, reproducible)."""
    keep = round(share * count)
    generator = torch.Generator().manual_seed(_generator_seed(seed, step, layer))
    return torch.randperm(count, generator=generator)[:keep].sort().values


@dataclass
class AttentionBank:
    """The identity frames' lent tokens, per (step, layer): frame -> [2 (positive, negative), tokens, channels]."""

    settings: SharingSettings
    tokens: dict[tuple[int, str], dict[int, torch.Tensor]] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for slot in self.tokens.values() for t in slot.values())


class _BatchHook:
    """The pre-hook state for one batch: its frames, the current step, and the bank it writes and reads."""

    def __init__(self, bank: AttentionBank, frames: Sequence[tuple[int, int]]):
        self.bank, self.frames, self.step = bank, list(frames), 0  # frames: (index, seed) in batch order

    def hook(self, layer: str) -> Callable[..., Any]:
        def pre_hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            settings = self.bank.settings
            if not settings.active(self.step):
                return None
            hidden = args[0]  # [2B, tokens, channels]: the positive half, then the negative half
            size = len(self.frames)
            slot = self.bank.tokens.setdefault((self.step, layer), {})
            for position, (index, seed) in enumerate(self.frames):
                if settings.role(index) == IDENTITY:
                    chosen = lent_tokens(hidden.shape[1], settings.share, seed, self.step, layer).to(hidden.device)
                    slot[index] = torch.stack([hidden[position, chosen], hidden[size + position, chosen]])
            rows = []
            for half in (0, 1):
                for position, (index, _) in enumerate(self.frames):
                    lent = [slot[i][half] for i in sorted(slot) if i != index]
                    rows.append(torch.cat([hidden[half * size + position], *lent]))
            if rows[0].shape[0] == hidden.shape[1]:
                return None  # nothing lent (a lone identity frame, or a share of 0)
            return args, {**kwargs, "encoder_hidden_states": torch.stack(rows)}

        return pre_hook


class SharedAttention:
    """The hooks of one batch; ``remove`` takes them out (an earlier batch's leftovers go when the next installs)."""

    _installed: dict[int, list[Any]] = {}  # id(unet) -> handles still in place (after an exception mid-batch)

    def __init__(self, unet: torch.nn.Module, bank: AttentionBank | None, frames: Sequence[tuple[int, int]]):
        self.unet, self.handles, self.state = unet, [], None
        for handle in self._installed.pop(id(unet), []):
            handle.remove()
        if bank is None or not any(bank.settings.role(index) for index, _ in frames):
            return  # nothing installed: DiffSynth runs exactly as without
        self.state = _BatchHook(bank, frames)
        self.handles = [module.register_forward_pre_hook(self.state.hook(name), with_kwargs=True)
                        for name, module in attention_layers(unet) if selected(name, bank.settings.layers)]
        self._installed[id(unet)] = self.handles

    def at_step(self, step: int) -> None:
        if self.state is not None:
            self.state.step = step

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self._installed.pop(id(self.unet), None)
        self.handles = []


def shared_attention(unet: torch.nn.Module, bank: AttentionBank | None,
                     frames: Sequence[tuple[int, int]]) -> SharedAttention:
    """Hook the chosen self-attention layers for one batch of (index, seed) frames, in batch order.

    With no bank, or no frame of the batch sharing, nothing is installed.
    """
    return SharedAttention(unet, bank, frames)
