"""Export a kstory LoRA (DiffSynth ``SDXLUNet`` names) to the diffusers and kohya-style formats, and back.

Only the block numbering differs between the formats. DiffSynth numbers the
UNet's blocks in one flat list (``blocks.<i>``); diffusers and kohya name them
by level (``down_blocks.<l>.attentions.<j>``). Kolors keeps SDXL's topology
(three levels, two resnets per down level and three per up level, attention
on levels 1 and 2), and the tiny test model keeps it too, so one table maps
every ``blocks.<i>`` that holds attention to its diffusers prefix.

Formats written by :func:`export_lora`:

``diffsynth``
    the kstory file as trained (``blocks.<i>...lora_A.default.weight``), metadata kept.
``diffusers``
    ``unet.<diffusers module>.lora_A.weight`` / ``lora_B.weight``, unscaled,
    with the peft config (rank and alpha) in the ``lora_adapter_metadata``
    safetensors metadata entry that diffusers' ``load_lora_weights`` reads, so
    the strength is exactly alpha/rank without touching the factors.
``kohya``
    ``lora_unet_<diffusers module with _>.lora_down.weight`` / ``lora_up.weight``
    plus a scalar ``.alpha`` per module, in diffusers' module names: what ComfyUI's
    LoRA key map (Kolors-MZ) and diffusers' non-diffusers converter read. WebUI and
    kohya sd-scripts do not run Kolors at all (docs/submissions.md).

Every conversion is a pure rename (same tensors, bit for bit), so
:func:`to_diffsynth` restores the original file's tensors exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kstory.core.atomic import atomic_path, copy_file
from kstory.core.errors import KstoryError
from kstory.core.unet_names import sdxl_block_prefixes

FORMATS = ("diffsynth", "diffusers", "kohya")
FILE_NAMES = {
    "diffsynth": "lora.safetensors",
    "diffusers": "pytorch_lora_weights.safetensors",  # diffusers' default weight_name
    "kohya": "lora_kohya.safetensors",
}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
_DIFFSYNTH_KEY = re.compile(
    r"^blocks\.(\d+)\.(transformer_blocks\.\d+\.attn[12]\.(?:to_q|to_k|to_v|to_out))\.lora_([AB])\.default\.weight$"
)
_DIFFUSERS_KEY = re.compile(r"^unet\.(.+)\.lora_([AB])\.weight$")
_KOHYA_KEY = re.compile(r"^lora_unet_(.+)\.(lora_down\.weight|lora_up\.weight|alpha)$")


_PREFIXES = sdxl_block_prefixes()
_BLOCK_OF = {prefix: i for i, prefix in enumerate(_PREFIXES) if prefix and ".attentions." in prefix}


def _module_to_diffusers(block: int, inner: str) -> str:
    prefix = _PREFIXES[block] if 0 <= block < len(_PREFIXES) else None
    if prefix is None or ".attentions." not in prefix:
        raise KstoryError(
            f"blocks.{block} is not an attention block of Kolors' UNet",
            fix="export only LoRAs trained by 'kstory train' on a Kolors-layout UNet",
        )
    inner = inner[: -len("to_out")] + "to_out.0" if inner.endswith("to_out") else inner
    return f"{prefix}.{inner}"


def _module_from_diffusers(module: str) -> tuple[int, str]:
    match = re.match(r"^((?:down_blocks|up_blocks)\.\d+\.attentions\.\d+|mid_block\.attentions\.0)\.(.+)$", module)
    if not match or match.group(1) not in _BLOCK_OF:
        raise KstoryError(f"not a Kolors UNet attention module: {module}", fix="use a file written by kstory")
    inner = match.group(2)
    inner = inner[: -len(".0")] if inner.endswith("to_out.0") else inner
    return _BLOCK_OF[match.group(1)], inner


def _kohya_name(diffusers_module: str) -> str:
    return "lora_unet_" + diffusers_module.replace(".", "_")


def _diffusers_module_from_kohya(flat: str) -> str:
    """Undo the ``.`` -> ``_`` flattening for the names this module writes."""
    match = re.match(
        r"^(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)$"
        r"|^mid_block_attentions_0_transformer_blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|to_out_0)$",
        flat,
    )
    if not match:
        raise KstoryError(f"unknown kohya module name lora_unet_{flat}", fix="use a file written by kstory")
    g = match.groups()
    if g[0]:
        leaf = "to_out.0" if g[5] == "to_out_0" else g[5]
        return f"{g[0]}.{g[1]}.attentions.{g[2]}.transformer_blocks.{g[3]}.{g[4]}.{leaf}"
    leaf = "to_out.0" if g[8] == "to_out_0" else g[8]
    return f"mid_block.attentions.0.transformer_blocks.{g[6]}.{g[7]}.{leaf}"


def split_diffsynth(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{diffusers module: {"A": tensor, "B": tensor}}`` from DiffSynth-named factors."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _DIFFSYNTH_KEY.match(key)
        if not match:
            raise KstoryError(f"unexpected tensor {key} in the LoRA", fix="use a lora.safetensors written by 'kstory train'")
        module = _module_to_diffusers(int(match.group(1)), match.group(2))
        modules.setdefault(module, {})[match.group(3)] = tensor
    incomplete = sorted(m for m, f in modules.items() if set(f) != {"A", "B"})
    if incomplete:
        raise KstoryError(f"LoRA module {incomplete[0]} lacks its A or B factor", fix="retrain or re-save the LoRA")
    return modules


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        f"unet.{module}.lora_{side}.weight": factors[side]
        for module, factors in sorted(split_diffsynth(state).items()) for side in ("A", "B")
    }


def to_kohya(state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for module, factors in sorted(split_diffsynth(state).items()):
        name = _kohya_name(module)
        out[f"{name}.lora_down.weight"] = factors["A"]
        out[f"{name}.lora_up.weight"] = factors["B"]
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


def _diffsynth_key(module: str, side: str) -> str:
    block, inner = _module_from_diffusers(module)
    return f"blocks.{block}.{inner}.lora_{side}.default.weight"


def diffusers_to_diffsynth(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        match = _DIFFUSERS_KEY.match(key)
        if not match:
            raise KstoryError(f"unexpected tensor {key} in a diffusers LoRA", fix="use a file written by kstory")
        out[_diffsynth_key(match.group(1), match.group(2))] = tensor
    return out


def kohya_to_diffsynth(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """DiffSynth-named factors plus each module's alpha (by diffusers module name)."""
    out, alphas = {}, {}
    for key, tensor in state.items():
        match = _KOHYA_KEY.match(key)
        if not match:
            raise KstoryError(f"unexpected tensor {key} in a kohya LoRA", fix="use a file written by kstory")
        module = _diffusers_module_from_kohya(match.group(1))
        if match.group(2) == "alpha":
            alphas[module] = float(tensor)
        else:
            out[_diffsynth_key(module, "A" if match.group(2) == "lora_down.weight" else "B")] = tensor
    return out, alphas


def diffusers_adapter_metadata(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, object]:
    """The peft LoraConfig kwargs diffusers' ``load_lora_weights`` takes from the file, under ``unet.``."""
    modules = sorted(split_diffsynth(state))
    config = {
        "r": rank, "lora_alpha": alpha, "target_modules": modules, "rank_pattern": {}, "alpha_pattern": {},
        "use_dora": False, "lora_bias": False,
    }
    return {f"unet.{key}": value for key, value in config.items()}


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata() or {})


def export_lora(lora_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Write the LoRA in the three formats into ``out_dir``; returns ``{format: path}``.

    Raises KstoryError for a missing or foreign LoRA. Each export is checked
    before returning: it converts back to exactly the original tensors.
    """
    from kstory.core.lora import read_lora

    lora_path, out_dir = Path(lora_path), Path(out_dir)
    state, metadata = read_lora(lora_path)
    if not state:
        raise KstoryError("the LoRA holds no tensors", path=lora_path, fix="retrain it")
    rank, alpha = int(metadata["kstory.rank"]), float(metadata["kstory.alpha"])
    info = {
        "kstory.source_format": "kstory-lora/1 (DiffSynth SDXLUNet names)",
        "kstory.rank": str(rank), "kstory.alpha": repr(alpha),
        "kstory.strength": repr(alpha / rank),
        "kstory.base_model": metadata.get("kstory.base_model", ""),
        "kstory.trigger_word": metadata.get("kstory.trigger_word", ""),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"diffsynth": out_dir / FILE_NAMES["diffsynth"]}
    if paths["diffsynth"].resolve() != lora_path.resolve():
        copy_file(lora_path, paths["diffsynth"])
    diffusers_meta = {"format": "pt", **info,
                      DIFFUSERS_METADATA_KEY: json.dumps(diffusers_adapter_metadata(state, rank, alpha), sort_keys=True)}
    paths["diffusers"] = _save(out_dir / FILE_NAMES["diffusers"], to_diffusers(state), diffusers_meta)
    paths["kohya"] = _save(out_dir / FILE_NAMES["kohya"], to_kohya(state, alpha),
                           {"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": repr(alpha),
                            "ss_base_model_version": "kolors", **info})
    check_exports(state, alpha, paths)
    return paths


def check_exports(state: dict[str, torch.Tensor], alpha: float, paths: dict[str, Path]) -> None:
    """Every exported file must convert back to exactly ``state`` (names, shapes and bits)."""
    back = {
        "diffusers": diffusers_to_diffsynth(read_safetensors(paths["diffusers"])[0]),
        "kohya": kohya_to_diffsynth(read_safetensors(paths["kohya"])[0])[0],
    }
    for fmt, tensors in back.items():
        if tensors.keys() != state.keys() or any(not torch.equal(tensors[k], state[k]) for k in state):
            raise KstoryError(f"the {fmt} export does not round-trip to the original LoRA", path=paths[fmt],
                              fix="report this as a kstory bug")
    _, alphas = kohya_to_diffsynth(read_safetensors(paths["kohya"])[0])
    if any(a != float(alpha) for a in alphas.values()):
        raise KstoryError("the kohya export has a wrong alpha", path=paths["kohya"], fix="report this as a kstory bug")
