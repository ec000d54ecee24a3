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
