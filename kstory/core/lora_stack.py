"""Stack the user's own LoRAs on Kolors' UNet: match each file's modules, refuse a foreign base, merge.

Checks run against a weightless (``meta``) copy of the UNet, so a wrong file
fails in the first seconds, before any weights load; the merge itself runs
when the story's UNet is loaded. Each module is merged as
``W += scale * alpha / rank * up @ down``, with the module's own alpha when
the file has one (kohya ``.alpha``), else the file's (peft ``lora_alpha``),
else the rank (strength 1, what diffusers and DiffSynth apply then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.lora_formats import LoraFile, LoraModule, metadata_rank_alpha, read_lora_file

log = get_logger("lora")

COMBINED_SCALE_WARNING = 2.5  # sum of |scale| over every LoRA of a story above which a warning is logged
_EXAMPLES = 3
_FIX_BASE = "use a LoRA trained on Kolors (Kwai-Kolors/Kolors); LoRAs for SDXL or SD1.5 do not fit its UNet"
_KNOWN_WIDTHS = {768: "SD1.5 (CLIP ViT-L text states, 768 wide)", 1024: "SD2 (OpenCLIP ViT-H text states, 1024 wide)"}


@dataclass(frozen=True)
class LoraRequest:
    """A LoRA the user brings: the file, its scale, where it came from, and whether its licence lets kstory ship it."""

    path: Path
    scale: float = 1.0
    source: str = ""
    ship: bool = False


@dataclass
class PlannedLora:
    """A checked LoRA: for every UNet module it adapts, the strength and factors to merge."""

    request: LoraRequest
    file: LoraFile
    targets: dict[str, tuple[float, LoraModule]]  # DiffSynth module -> (alpha, factors)
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """What the manifest keeps: enough to find the file again (by hash) and to say what was merged."""
        ranks = sorted({module.rank for _, module in self.targets.values()})
        alphas = sorted({alpha for alpha, _ in self.targets.values()})
        return {
            "path": str(self.request.path), "file": self.request.path.name, "sha256": self.file.sha256,
            "format": self.file.format, "scale": self.request.scale, "source": self.request.source,
            "ship": self.request.ship, "modules": len(self.targets),
            "rank": ranks[0] if len(ranks) == 1 else ranks,
            "alpha": round(alphas[0], 6) if len(alphas) == 1 else [round(a, 6) for a in alphas],
            "ignored": {"text_encoder": len(self.file.text_encoder_keys), "unmatched": len(self.unmatched),
                        "unknown": len(self.file.unknown_keys) + len(self.file.incomplete)},
        }


def unet_skeleton(weights: Any) -> torch.nn.Module:
    """DiffSynth's Kolors UNet for ``weights`` (a ``KolorsWeights``) on the meta device: names and shapes, no memory."""
    from diffsynth.models.sdxl_unet import SDXLUNet

    from kstory.core.models.tiny import TinyKolorsSpec, read_tiny_manifest, tiny_unet

    with torch.device("meta"):
        if weights.is_tiny:
            return tiny_unet(TinyKolorsSpec.from_json(read_tiny_manifest(weights.root)["spec"]))[0]
        return SDXLUNet(is_kolors=True)


def plan_loras(requests: Sequence[LoraRequest], unet: torch.nn.Module, *, own_scale: float | None = None
               ) -> list[PlannedLora]:
    """Check every requested LoRA against ``unet`` (real or meta) and log what each one adapts and ignores.

    ``own_scale`` is the scale of the story's own trained LoRA (None without one); it counts toward the
    combined-scale warning.
    """
    from kstory.core.unet_names import module_spellings

    if not requests:
        return []
    spellings = module_spellings(unet)
    planned = [plan_lora(request, spellings) for request in requests]
    combined = sum(abs(r.scale) for r in requests) + (abs(own_scale) if own_scale is not None else 0.0)
    if combined > COMBINED_SCALE_WARNING:
        log.warning("the LoRAs' scales add up to %.2g (above %.2g): stacked this strongly they often overcook the "
                    "picture; lower some scales if it does", combined, COMBINED_SCALE_WARNING)
    return planned


def plan_lora(request: LoraRequest, spellings: dict[str, tuple[str, tuple[int, ...]]]) -> PlannedLora:
    """Match one file's modules to the UNet; KstoryError for a foreign base model or no match at all."""
    found = read_lora_file(request.path)
    path = request.path
    if found.second_text_encoder:
        raise KstoryError("this is an SDXL LoRA: it has keys for SDXL's two CLIP text encoders (lora_te1_/lora_te2_ "
                          "or text_encoder_2), and Kolors has one ChatGLM text encoder", path=path, fix=_FIX_BASE)
    base = _metadata_base(found.metadata)
    if base:
        raise KstoryError(f"this LoRA's metadata says it was trained on {base}, not Kolors", path=path, fix=_FIX_BASE)
    _check_cross_attention(found, spellings, path)
    planned = PlannedLora(request, found, {})
    for name, module in found.modules.items():
        match = spellings.get(name)
        if match is None:
            planned.unmatched.append(name)
            continue
        target, shape = match
        _check_shape(name, module, shape, path)
        if target in planned.targets:
            raise KstoryError(f"the LoRA adapts the UNet module {target} twice (under two spellings)", path=path,
                              fix="keep one spelling of each module in the file")
        alpha = module.alpha if module.alpha is not None else found.file_alpha
        planned.targets[target] = (float(module.rank) if alpha is None else alpha, module)
    if not planned.targets:
        examples = ", ".join(sorted(found.modules)[:_EXAMPLES]) or "none"
        raise KstoryError(f"no key of this {found.format} LoRA matches a module of Kolors' UNet "
                          f"({len(found.modules)} UNet module(s), e.g. {examples}; "
                          f"{len(found.text_encoder_keys)} text-encoder key(s))", path=path, fix=_FIX_BASE)
    _note_metadata(planned)
    _log_report(planned)
    return planned


def _metadata_base(metadata: dict[str, str]) -> str | None:
    """The non-Kolors base a kohya/modelspec metadata block names, if it names one."""
    fields = [metadata.get(k, "") for k in ("ss_base_model_version", "modelspec.architecture", "ss_sd_model_name")]
    text = " ".join(fields).lower()
    if "kolors" in text:
        return None
    claim = " ".join(fields[:2]).lower()  # the model file name alone proves nothing
    if "sdxl" in claim or "stable-diffusion-xl" in claim:
        return "SDXL"
    if "sd_v1" in claim or "stable-diffusion-v1" in claim:
        return "SD1.5"
    if "sd_v2" in claim or "stable-diffusion-v2" in claim:
        return "SD2"
    return None


def _check_cross_attention(found: LoraFile, spellings: dict[str, tuple[str, tuple[int, ...]]], path: Path) -> None:
    """Cross-attention keys and values read the text states: their width names the text encoder the LoRA was for."""
    widths = {shape[1] for name, (target, shape) in spellings.items() if target.endswith(("attn2.to_k", "attn2.to_v"))}
    ours = max(widths) if widths else None
    for name, module in found.modules.items():
        if not name.replace("_", ".").endswith(("attn2.to.k", "attn2.to.v")):
            continue
        width = int(module.down.shape[1])
        if ours is not None and width != ours:
            made_for = _KNOWN_WIDTHS.get(width, f"a model whose text states are {width} wide")
            raise KstoryError(
                f"this LoRA was made for {made_for}: its cross-attention ({name}) reads {width}-wide text states, "
                f"and Kolors' reads {ours}-wide ones (ChatGLM's 4096-wide states through encoder_hid_proj)",
                path=path, fix=_FIX_BASE)


def _check_shape(name: str, module: LoraModule, shape: tuple[int, ...], path: Path) -> None:
    if module.up.shape[1] != module.down.shape[0]:
        raise KstoryError(f"module {name}: lora_up has rank {module.up.shape[1]}, lora_down {module.down.shape[0]}",
                          path=path, fix="the file is damaged; download it again")
    delta = (int(module.up.shape[0]), *(int(d) for d in module.down.shape[1:]))
    if _squeezed(delta) != _squeezed(shape):
        hint = " (SDXL's pooled CLIP states: an SDXL LoRA)" if delta[-1] == 2816 else ""
        raise KstoryError(f"module {name} does not fit Kolors' UNet: the LoRA changes a {delta} weight{hint}, "
                          f"Kolors' is {shape}", path=path, fix=_FIX_BASE)


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    while len(shape) > 2 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _note_metadata(planned: PlannedLora) -> None:
    """Warn when the metadata's rank or alpha contradicts the tensors (the tensors' rank and the file's alpha win)."""
    found = planned.file
    meta_rank, meta_alpha = metadata_rank_alpha(found)
    ranks = sorted({module.rank for _, module in planned.targets.values()})
    if meta_rank is not None and ranks != [meta_rank]:
        planned.warnings.append(f"its metadata says rank {meta_rank}, its tensors have rank {', '.join(map(str, ranks))}: "
                                "using the tensors' rank")
    tensor_alphas = sorted({m.alpha for _, m in planned.targets.values() if m.alpha is not None})
    if meta_alpha is not None and tensor_alphas and tensor_alphas != [meta_alpha]:
        planned.warnings.append(f"its metadata says alpha {meta_alpha:g}, its .alpha tensors say "
                                f"{', '.join(f'{a:g}' for a in tensor_alphas)}: using the tensors' alpha")


def _log_report(planned: PlannedLora) -> None:
    found, name = planned.file, planned.request.path.name
    log.info("LoRA %s (%s, sha256 %s): %d UNet module(s) at scale %g", name, found.format, found.sha256[:12],
             len(planned.targets), planned.request.scale)
    for warning in planned.warnings:
        log.warning("LoRA %s: %s", name, warning)
    if found.text_encoder_keys:
        log.warning("LoRA %s: %d text-encoder key(s) ignored (e.g. %s): kstory merges LoRAs into the UNet only",
                    name, len(found.text_encoder_keys), ", ".join(found.text_encoder_keys[:_EXAMPLES]))
    if planned.unmatched:
        log.warning("LoRA %s: %d module(s) match nothing in Kolors' UNet and are ignored (e.g. %s)", name,
                    len(planned.unmatched), ", ".join(planned.unmatched[:_EXAMPLES]))
    other = found.unknown_keys + [f"{m} (one factor only)" for m in found.incomplete]
    if other:
        log.warning("LoRA %s: %d key(s) of no LoRA kind kstory merges are ignored (e.g. %s)", name, len(other),
                    ", ".join(other[:_EXAMPLES]))


@torch.no_grad()
def merge_loras(unet: torch.nn.Module, planned: Sequence[PlannedLora]) -> int:
    """Add every planned LoRA into ``unet``'s weights in place, in order; returns the modules changed."""
    changed = 0
    for lora in planned:
        for target, (alpha, module) in lora.targets.items():
            strength = lora.request.scale * alpha / module.rank
            weight = unet.get_submodule(target).weight
            up = module.up.to(weight.device, torch.float32).flatten(1)
            down = module.down.to(weight.device, torch.float32).flatten(1)
            delta = strength * torch.mm(up, down)
            weight += delta.reshape(weight.shape).to(weight.dtype)
            changed += 1
    return changed


def check_loras(requests: Sequence[LoraRequest], weights: Any, *, own_scale: float | None = None) -> list[PlannedLora]:
    """:func:`plan_loras` against a weightless copy of ``weights``' UNet: wrong files fail before anything loads."""
    return plan_loras(requests, unet_skeleton(weights), own_scale=own_scale) if requests else []


def requests_from_records(records: Sequence[dict[str, Any]], candidates: Sequence[Path] = (),
                          where: Path | None = None) -> list[LoraRequest]:
    """The LoRAs a manifest recorded, each found by its sha256: among ``candidates`` first, then at its recorded path.

    A file not found is a KstoryError naming it by name, hash and source, so the user can supply it.
    """
    from kstory.core.hashing import sha256_file

    hashes: dict[str, Path] = {}
    for path in candidates:
        if Path(path).is_file():
            hashes.setdefault(sha256_file(Path(path)), Path(path))
    found = []
    for record in records:
        path = hashes.get(record["sha256"])
        recorded = Path(record["path"])
        if path is None and recorded.is_file() and sha256_file(recorded) == record["sha256"]:
            path = recorded
        if path is None:
            source = f", from {record['source']}" if record.get("source") else ""
            raise KstoryError(
                f"the LoRA {record['file']} (sha256 {record['sha256'][:12]}{source}) the frames were made with is "
                "not here", path=where,
                fix=f"pass it with --lora PATH (it is found by its sha256 {record['sha256']})")
        found.append(LoraRequest(path, float(record["scale"]), record.get("source", ""), bool(record.get("ship"))))
    return found
