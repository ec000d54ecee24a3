"""Integer weights for ChatGLM (torchao), so the 6B text encoder fits beside less memory.

ChatGLM is 12.5 GB in half precision and runs once per new prompt, so its
weights are the cheapest place to trade accuracy for memory: ``int8`` keeps
one byte per weight (per-channel scales), ``int4`` keeps four bits' worth of
levels in groups of 32 weights. Only the linear layers are quantised; the
embeddings and norms stay in the run's dtype. The embedding error against
half precision is measured by ``bench/bench_text_encoder_dtype.py``.

torchao's int4 kernels on this path store the 4-bit levels unpacked in int8,
so on the CPU ``int4`` saves no memory over ``int8``: it is there to measure
and for GPUs whose kernels pack it.
"""

from __future__ import annotations

import logging

import torch

from kstory.core.errors import KstoryError

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32


def check_quant_mode(mode: str) -> str:
    """``mode`` if kstory knows it, else a KstoryError naming the choices."""
    if mode not in QUANT_MODES:
        raise KstoryError(f"unknown text_encoder_quant {mode!r}", fix=f"use one of: {', '.join(QUANT_MODES)}")
    return mode


def _torchao():
    logging.getLogger("torchao").setLevel(logging.ERROR)  # it warns about CUDA-only kernels it cannot load
    try:
        import torchao.quantization as quantization
    except ImportError as error:
        raise KstoryError("text_encoder_quant needs torchao, which is not installed",
                          fix='pip install "kstory[quant]" (torchao), or set text_encoder_quant: none') from error
    return quantization


def quantize_text_encoder(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantise ``model``'s linear weights in place to ``mode`` (``none`` leaves it as it is)."""
    if check_quant_mode(mode) == "none":
        return model
    quantization = _torchao()
    if mode == "int8":
        config = quantization.Int8WeightOnlyConfig(version=2)
    else:
        from torchao.quantization.granularity import PerGroup

        config = quantization.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(INT4_GROUP))
    quantization.quantize_(model, config)
    return model


UNET_QUANT_MODES = ("none", "int8")
# Share of the Kolors UNet's parameters in its transformer blocks' Linear layers (2.18 of 2.58 billion, counted
# on DiffSynth's SDXLUNet): what int8 base weights shrink from two bytes to one.
UNET_QUANTISED_SHARE = 0.85


def in_transformer_block(module: torch.nn.Module, name: str) -> bool:
    """Only the attention and feed-forward Linears: their outputs feed full-precision projections, so under
    CPU autocast nothing downstream sees a float32 tensor beside half-precision norm weights."""
    return isinstance(module, torch.nn.Linear) and ".transformer_blocks." in f".{name}"


def unet_quant_config(mode: str):
    """torchao's config for the UNet's ``mode`` (``None`` for ``none``); a KstoryError for an unknown mode."""
    if mode not in UNET_QUANT_MODES:
        raise KstoryError(f"unknown unet_quant {mode!r}", fix=f"use one of: {', '.join(UNET_QUANT_MODES)}")
    if mode == "none":
        return None
    return _torchao().Int8WeightOnlyConfig(version=2)


def quantize_unet(unet: torch.nn.Module, mode: str) -> int:
    """Store the frozen UNet's transformer-block Linear weights as int8 (QLoRA-style); returns how many.

    peft puts its LoRA layers around torchao's quantised Linears, so the LoRA
    trains in float32 against the integer base. Convolutions, time and text
    embeddings and the block projections stay in the run's dtype.
    """
    config = unet_quant_config(mode)
    if config is None:
        return 0
    count = sum(1 for name, module in unet.named_modules() if in_transformer_block(module, name))
    _torchao().quantize_(unet, config, filter_fn=in_transformer_block)
    return count


def quantize_linear(linear: torch.nn.Linear, config) -> None:
    """One Linear's weight quantised in place with ``config`` (from :func:`unet_quant_config`), as
    :func:`quantize_unet` does to each: for a loader that quantises each weight as it arrives."""
    _torchao().quantize_(linear, config)
