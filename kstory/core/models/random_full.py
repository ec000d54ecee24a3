"""A random-weight Kolors at full size, in a published file layout, for benchmarks.

Memory and load-time work (phase-by-phase loading, fp16 plans, shard
streaming) needs files of the real sizes and layout without a 17 GB download.
Shapes come from DiffSynth's classes built on the meta device (the tiny
builders at the real widths, checked against DiffSynth's own full-size
classes by the tests), and each tensor is drawn directly in fp16 from its own
seeded generator just before it is written: a float32 6B model never exists,
and the writer holds one ``.bin`` shard (at most 2 GB) at a time.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffsynth.models.kolors_text_encoder import ChatGLMConfig, ChatGLMModel, RotaryEmbedding

from kstory.core.atomic import atomic_directory, write_json
from kstory.core.models.tiny import (
    _NORMS,
    KOLORS_SPEC,
    TinyKolorsSpec,
    _generator,
    text_encoder_config,
    tiny_unet,
    tiny_vae_decoder,
    tiny_vae_encoder,
    unet_to_diffusers,
    vae_to_diffusers,
)
from kstory.core.models.writers import TensorEntry, write_kolors_weights

STD = 0.02  # small enough that activations stay finite in fp16 through 28 ChatGLM layers
DTYPE = torch.float16
MARKER = "kstory_random.json"

Kinds = dict[str, str]  # state-dict key -> "normal" | "ones" | "zeros" | "rotary"


def _kinds(model: torch.nn.Module) -> Kinds:
    """How each state-dict entry is filled: norm scales 1, biases 0, rotary frequencies exact, the rest N(0, STD)."""
    kinds: Kinds = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, _ in module.named_parameters(recurse=False):
            if isinstance(module, _NORMS):
                kinds[prefix + name] = "ones" if name == "weight" else "zeros"
            else:
                kinds[prefix + name] = "zeros" if name == "bias" else "normal"
        for name, _ in module.named_buffers(recurse=False):
            kinds[prefix + name] = "rotary" if isinstance(module, RotaryEmbedding) else "zeros"
    missing = set(model.state_dict()) - set(kinds)
    if missing:
        raise TypeError(f"no fill rule for {sorted(missing)}")
    return kinds


def _entries(shapes: dict[str, torch.Tensor], kinds: Kinds) -> tuple[list[TensorEntry], Kinds]:
    entries = [TensorEntry(name, tuple(tensor.shape), DTYPE) for name, tensor in sorted(shapes.items())]
    return entries, {name: kinds[name] for name in shapes}


def kolors_entries(spec: TinyKolorsSpec = KOLORS_SPEC) -> dict[str, tuple[list[TensorEntry], Kinds]]:
    """Per part (text_encoder, unet, vae): the published keys with shapes, and how to fill each; meta device only."""
    with torch.device("meta"):
        unet, unet_prefixes = tiny_unet(spec)
        encoder, encoder_prefixes = tiny_vae_encoder(spec)
        decoder, decoder_prefixes = tiny_vae_decoder(spec)
    config = ChatGLMConfig(**{**text_encoder_config(spec), "torch_dtype": "float16"})
    text_encoder = ChatGLMModel(config, device="meta")  # device= keeps skip_init from allocating on the CPU

    unet_kinds, encoder_kinds, decoder_kinds = _kinds(unet), _kinds(encoder), _kinds(decoder)
    unet_sd = unet.state_dict()
    unet_shapes = unet_to_diffusers(unet_sd, unet_prefixes)
    unet_kind_map = unet_to_diffusers(unet_kinds, unet_prefixes)  # renaming only: the values ride along
    encoder_sd, decoder_sd = encoder.state_dict(), decoder.state_dict()
    vae_shapes = vae_to_diffusers(encoder_sd, encoder_prefixes, decoder_sd, decoder_prefixes)
    vae_kind_map = vae_to_diffusers(encoder_kinds, encoder_prefixes, decoder_kinds, decoder_prefixes)
    text_sd = text_encoder.state_dict()  # module order, as transformers shards it
    text_kinds = _kinds(text_encoder)
    text_entries = [TensorEntry(name, tuple(tensor.shape), DTYPE) for name, tensor in text_sd.items()]
    return {
        "text_encoder": (text_entries, text_kinds),
        "unet": _entries(unet_shapes, unet_kind_map),
        "vae": _entries(vae_shapes, vae_kind_map),
    }


def _maker(spec: TinyKolorsSpec, seed: int, part: str, kinds: Kinds):
    rotary_dim = spec.text_kv_channels // 2

    def make(entry: TensorEntry) -> torch.Tensor:
        kind = kinds[entry.name]
        if kind == "ones":
            return torch.ones(entry.shape, dtype=entry.dtype)
        if kind == "zeros":
            return torch.zeros(entry.shape, dtype=entry.dtype)
        if kind == "rotary":
            return RotaryEmbedding(rotary_dim, original_impl=True, dtype=entry.dtype).inv_freq
        generator = _generator(seed, part, entry.name)
        return torch.randn(entry.shape, generator=generator, dtype=entry.dtype).mul_(STD)

    return make


def write_random_kolors(
    out: str | Path, spec: TinyKolorsSpec = KOLORS_SPEC, seed: int = 0, layout: str = "official"
) -> Path:
    """Write a random-weight Kolors to ``out`` (which must not exist), fp16, in ``layout`` (default: Kwai-Kolors/Kolors).

    ``spec`` defaults to the real widths; a smaller one writes the same
    layout at reduced size. Same spec and seed -> the same tensors.
    """
    out = Path(out)
    with atomic_directory(out) as staging:
        parts = {
            part: (entries, _maker(spec, seed, part, kinds))
            for part, (entries, kinds) in kolors_entries(spec).items()
        }
        write_kolors_weights(staging, layout, parts["text_encoder"], parts["unet"], parts["vae"])
        write_json(staging / "text_encoder" / "config.json", {**text_encoder_config(spec), "torch_dtype": "float16"})
        write_json(
            staging / MARKER,
            {
                "kind": "kstory/random-kolors",
                "note": "random weights for benchmarks; its images mean nothing",
                "seed": seed,
                "layout": layout,
                "spec": spec.to_json(),
            },
        )
    return out
