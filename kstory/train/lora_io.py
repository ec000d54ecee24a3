"""Training-side LoRA: peft injection into DiffSynth's UNet (the file format and merging live in kstory.core.lora).

Format (``kstory-lora/1``): the tensors are peft's raw LoRA factors under the
names peft gives them inside DiffSynth's ``SDXLUNet``::

    blocks.<i>.transformer_blocks.<j>.attn<1|2>.<to_q|to_k|to_v|to_out>.lora_A.default.weight  [rank, in]
    blocks.<i>.transformer_blocks.<j>.attn<1|2>.<to_q|to_k|to_v|to_out>.lora_B.default.weight  [out, rank]

which is exactly what DiffSynth's ``GeneralLoRAFromPeft`` (and so
``ModelManager.load_lora``) matches. DiffSynth merges ``W += lora_alpha * B @ A``
and ignores peft's alpha/rank, so the file records both and
:func:`load_lora_into_pipeline` passes ``alpha / rank * scale``; with DiffSynth's
own loader use ``lora_alpha=float(metadata["kstory.diffsynth_lora_alpha"])``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kstory.core.errors import KstoryError
from kstory.core.lora import (  # noqa: F401  (the file functions, for the trainer and older imports)
    ADAPTER, FORMAT, META_ALPHA, META_BASE, META_CONFIG, META_DIFFSYNTH_ALPHA, META_FINGERPRINT, META_FORMAT,
    META_KSTORY_FORMAT, META_RANK, META_STEP, META_TARGETS, META_TRIGGER, META_VERSION, build_metadata,
    load_lora_into_pipeline, lora_strength, read_lora, save_lora,
)


def inject_lora(unet: torch.nn.Module, rank: int, alpha: float, target_modules: list[str], seed: int) -> list[str]:
    """Wrap the target Linear layers with peft LoRA (fp32 factors) and freeze everything else.

    B starts at zero, so the injected model equals the base model until it trains;
    A's Gaussian init is drawn from ``seed`` so a run is reproducible.
    """
    from peft import LoraConfig, inject_adapter_in_model

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(config, unet, adapter_name=ADAPTER)
    except ValueError as error:
        raise KstoryError(
            f"LoRA target modules not found in the UNet: {error}",
            fix="use names of DiffSynth's SDXL UNet attention layers, e.g. to_q, to_k, to_v, to_out",
        ) from error
    finally:
        torch.random.set_rng_state(state)
    names = []
    for name, param in unet.named_parameters():
        if ".lora_" in name:
            param.data = param.data.to(torch.float32)
            param.requires_grad_(True)
            names.append(name)
    return sorted(names)


def lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA factors (CPU, fp32, contiguous copies), ready for safetensors."""
    return {
        name: param.detach().to("cpu", torch.float32).contiguous().clone()
        for name, param in sorted(unet.named_parameters())
        if ".lora_A." in name or ".lora_B." in name
    }


def load_lora_state(unet: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy saved LoRA factors into an injected UNet; every factor must match by name and shape."""
    params = dict(unet.named_parameters())
    expected = {n for n in params if ".lora_A." in n or ".lora_B." in n}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise KstoryError(
            f"LoRA tensors do not match the model ({len(missing)} missing, {len(extra)} unexpected; "
            f"e.g. {(missing or extra)[0]})",
            fix="resume only with the same rank and target modules, or start fresh",
        )
    with torch.no_grad():
        for name, tensor in state.items():
            if params[name].shape != tensor.shape:
                raise KstoryError(
                    f"LoRA tensor {name} has shape {tuple(tensor.shape)}, the model needs {tuple(params[name].shape)}",
                    fix="resume only with the same rank and base model, or start fresh",
                )
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


