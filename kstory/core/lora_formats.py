"""Read a LoRA file someone else made: detect its format from its keys and group its factors by module.

Kolors LoRAs come from LiblibAI, Civitai and ModelScope in three key formats:

``kohya``
    ``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` and a
    scalar ``.alpha`` per module, the module spelled as diffusers names it
    (``down_blocks_1_attentions_0_...``, what kstory exports) or as the
    original SGM checkpoints do (``input_blocks_4_1_...``, ``kohya-sgm``);
    ``lora_te*`` keys belong to a text encoder.
``diffusers``
    ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (peft; ``lora.down`` /
    ``lora.up`` in older files), the rank and alpha in the
    ``lora_adapter_metadata`` safetensors entry when present.
``diffsynth``
    DiffSynth's own ``blocks.<i>.<module>.lora_A.default.weight`` (what
    DiffSynth-Studio and ``kstory train`` write).

This module only reads and sorts; matching modules to the UNet, refusing a
LoRA for another base model and merging are in :mod:`kstory.core.lora_stack`.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file

FORMATS = ("kohya", "kohya-sgm", "diffusers", "diffsynth")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_FIX = "use a LoRA file in kohya/ComfyUI, diffusers/peft or DiffSynth format (docs/story.md, 'Bringing LoRAs')"

_KOHYA = re.compile(r"^lora_(unet|te\d?)_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(r"^(?:(unet|text_encoder(?:_\d)?)\.)?(.+?)\.(lora_A|lora_B|lora\.down|lora\.up)(?:\.default)?\.weight$")
_PROCESSOR = re.compile(r"^(?:(unet)\.)?(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_SGM = ("input_blocks", "middle_block", "output_blocks")
_DIFFSYNTH_TOP = ("time_embedding.0", "time_embedding.2", "add_time_embedding.0", "add_time_embedding.2",
                  "text_intermediate_proj")  # DiffSynth's own top-level names (diffusers spells them otherwise)


@dataclass
class LoraModule:
    """One adapted module: its factors and, when the file stores one, its own alpha."""

    down: torch.Tensor  # A: (rank, in[, kh, kw])
    up: torch.Tensor  # B: (out, rank[, 1, 1])
    alpha: float | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraFile:
    """A LoRA file as found: its UNet modules (by the file's own module names) and everything else."""

    path: Path
    sha256: str
    format: str  # one of FORMATS
    modules: dict[str, LoraModule]
    text_encoder_keys: list[str] = field(default_factory=list)  # lora_te*, text_encoder.*: ignored
    second_text_encoder: bool = False  # lora_te1/te2 or text_encoder_2: SDXL's pair of CLIP encoders
    unknown_keys: list[str] = field(default_factory=list)  # keys of no LoRA format kstory reads
    incomplete: list[str] = field(default_factory=list)  # modules with only one of the two factors
    metadata: dict[str, str] = field(default_factory=dict)
    file_alpha: float | None = None  # peft lora_alpha / kstory.alpha; None: alpha = rank (strength 1)


def read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, or of a pickle that loads with ``weights_only``."""
    path = Path(path)
    if not path.is_file():
        raise KstoryError("LoRA file not found", path=path, fix="check the path (relative paths are taken from the "
                          "config file or the current folder)")
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError) as error:
        raise KstoryError(f"not a readable safetensors file ({error})", path=path, fix=_FIX) from error


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    """Only ``torch.load(weights_only=True)``: a pickle that needs more could run code, so it is refused."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError, TypeError) as error:
        raise KstoryError(
            f"this pickle does not load with weights_only=True, so it could run code when loaded and is refused "
            f"({str(error).splitlines()[0] if str(error) else type(error).__name__})",
            path=path, fix="convert it to safetensors where you trust it, or get the .safetensors release") from error
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise KstoryError("this pickle holds no state dict of tensors", path=path, fix=_FIX)
    return {str(k): v for k, v in data.items() if isinstance(v, torch.Tensor)}


def detect_format(keys: list[str]) -> str | None:
    """The format of a LoRA from its key names (None: no LoRA key at all)."""
    kohya = [k for k in keys if k.startswith("lora_unet_")]
    if kohya:
        return "kohya-sgm" if any(k[len("lora_unet_"):].startswith(_SGM) for k in kohya) else "kohya"
    unet = [m.group(2) for k in keys if (m := _PEFT.match(k) or _PROCESSOR.match(k)) and m.group(1) in (None, "unet")]
    if unet:
        names = [name.removeprefix("diffusion_model.") for name in unet]
        return "diffsynth" if any(name.startswith("blocks.") or name in _DIFFSYNTH_TOP for name in names) else "diffusers"
    if any(k.startswith("lora_te") for k in keys) or any(k.startswith("text_encoder") for k in keys):
        return "kohya" if any(k.startswith("lora_te") for k in keys) else "diffusers"
    return None


def read_lora_file(path: Path) -> LoraFile:
    """Read ``path`` and sort every key: UNet factors by module, text-encoder keys, unknown keys."""
    path = Path(path)
    tensors, metadata = read_tensors(path)
    fmt = detect_format(list(tensors))
    if fmt is None:
        examples = ", ".join(sorted(tensors)[:3]) or "no tensors at all"
        raise KstoryError(f"no LoRA keys found (e.g. {examples}): not a LoRA in a format kstory reads", path=path,
                          fix=_FIX)
    found = LoraFile(path, sha256_file(path), fmt, {}, metadata=metadata)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    alphas: dict[str, float] = {}
    for key, tensor in tensors.items():
        _sort_key(key, tensor, found, halves, alphas)
    for name, parts in sorted(halves.items()):
        if set(parts) != {"down", "up"}:
            found.incomplete.append(name)
            continue
        found.modules[name] = LoraModule(parts["down"], parts["up"], alphas.get(name))
    found.file_alpha = _file_alpha(fmt, metadata)
    return found


def _sort_key(key: str, tensor: torch.Tensor, found: LoraFile, halves: dict[str, dict[str, torch.Tensor]],
              alphas: dict[str, float]) -> None:
    kohya = _KOHYA.match(key)
    if kohya:
        owner, module, part = kohya.groups()
        if owner != "unet":
            found.text_encoder_keys.append(key)
            found.second_text_encoder |= owner in ("te1", "te2")
        elif part == "alpha":
            alphas[module] = float(tensor)
        else:
            halves.setdefault(module, {})["down" if part.startswith("lora_down") else "up"] = tensor
        return
    peft = _PEFT.match(key)
    processor = None if peft else _PROCESSOR.match(key)
    if peft or processor:
        owner = (peft or processor).group(1)
        if owner is not None and owner != "unet":
            found.text_encoder_keys.append(key)
            found.second_text_encoder |= owner == "text_encoder_2"
            return
        if peft:
            module, side = peft.group(2).removeprefix("diffusion_model."), peft.group(3)
        else:  # diffusers' old attention-processor LoRA: attn1.processor.to_q_lora.down
            leaf = "to_out.0" if processor.group(3) == "to_out" else processor.group(3)
            module, side = f"{processor.group(2)}.{leaf}", processor.group(4)
        halves.setdefault(module, {})["down" if side in ("lora_A", "lora.down", "down") else "up"] = tensor
        return
    if key.startswith(("lora_te", "text_encoder")):
        found.text_encoder_keys.append(key)
        found.second_text_encoder |= key.startswith(("lora_te1_", "lora_te2_", "text_encoder_2."))
        return
    found.unknown_keys.append(key)


def _file_alpha(fmt: str, metadata: Mapping[str, str]) -> float | None:
    """The alpha a format keeps for the whole file (kohya keeps one per module instead)."""
    if fmt == "diffusers" and metadata.get("lora_adapter_metadata"):
        try:
            config = json.loads(metadata["lora_adapter_metadata"])
            value = config.get("unet.lora_alpha", config.get("lora_alpha"))
            return None if value is None else float(value)
        except (ValueError, TypeError, AttributeError):
            return None
    if fmt == "diffsynth" and metadata.get("kstory.alpha"):
        return float(metadata["kstory.alpha"])
    return None


def metadata_rank_alpha(found: LoraFile) -> tuple[int | None, float | None]:
    """The rank and alpha the file's metadata claims (kohya ``ss_network_*``, peft config, kstory), if any."""
    meta = found.metadata
    try:
        if found.format.startswith("kohya"):
            rank = meta.get("ss_network_dim")
            alpha = meta.get("ss_network_alpha")
            return (int(float(rank)) if rank not in (None, "", "None") else None,
                    float(alpha) if alpha not in (None, "", "None") else None)
        if found.format == "diffusers" and meta.get("lora_adapter_metadata"):
            config = json.loads(meta["lora_adapter_metadata"])
            rank = config.get("unet.r", config.get("r"))
            return (int(rank) if rank is not None else None, found.file_alpha)
        if found.format == "diffsynth" and meta.get("kstory.rank"):
            return int(meta["kstory.rank"]), found.file_alpha
    except (ValueError, TypeError, AttributeError):
        return None, None
    return None, None
