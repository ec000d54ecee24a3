"""Write weights in the file layouts the published Kolors releases use.

Tests need the tiny model in each published layout, and benchmarks need a
full-size one that never fits in memory as float32; both go through these
writers, which take tensors one at a time from a callable, so a writer holds
at most one tensor (safetensors) or one shard (``.bin``) at once.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from kstory.core.atomic import atomic_path, write_json
from kstory.core.models.files import VARIANT, add_variant

TRANSFORMERS_MAX_SHARD_BYTES = 2_000_000_000  # the shard size ChatGLM's published .bin shards were cut at
_SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.int64: "I64"}


@dataclass(frozen=True)
class TensorEntry:
    """A tensor to write: its key, shape and dtype, known before any data exists."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


MakeTensor = Callable[[TensorEntry], torch.Tensor]


def write_safetensors(path: Path, entries: Sequence[TensorEntry], make: MakeTensor) -> None:
    """A safetensors file whose header is written first and tensors one by one (atomically)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": _SAFETENSORS_DTYPES[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # tensor data starts 8-byte aligned
    with atomic_path(path) as staging, open(staging, "wb") as handle:
        handle.write(struct.pack("<Q", len(encoded)) + encoded)
        for entry in entries:
            tensor = make(entry)
            if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
                raise ValueError(f"{entry.name}: made {tuple(tensor.shape)} {tensor.dtype}, declared {entry}")
            handle.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)


def plan_shards(entries: Sequence[TensorEntry], count: int, max_bytes: int | None = None) -> list[list[TensorEntry]]:
    """Split ``entries`` in order into ``count`` shards.

    transformers' rule (start a new shard when the next tensor would pass
    ``max_bytes``) is used when it gives exactly ``count`` shards, so a
    full-size ChatGLM gets the published shard sizes; otherwise (scaled-down
    models) the split balances bytes with every shard non-empty.
    """
    if len(entries) < count:
        raise ValueError(f"cannot split {len(entries)} tensors into {count} shards")
    if max_bytes is not None:
        shards: list[list[TensorEntry]] = [[]]
        for entry in entries:
            if shards[-1] and sum(e.nbytes for e in shards[-1]) + entry.nbytes > max_bytes:
                shards.append([])
            shards[-1].append(entry)
        if len(shards) == count:
            return shards
    shards, rest = [], list(entries)
    for left in range(count, 0, -1):
        target = sum(e.nbytes for e in rest) / left
        taken = [rest.pop(0)]
        while left > 1 and len(rest) > left - 1 and sum(e.nbytes for e in taken) + rest[0].nbytes / 2 <= target:
            taken.append(rest.pop(0))
        shards.append(taken if left > 1 else taken + rest)
    return shards


def write_bin_shards(
    folder: Path, entries: Sequence[TensorEntry], make: MakeTensor, count: int, max_bytes: int | None = None
) -> list[Path]:
    """``pytorch_model-0000N-of-0000M.bin`` shards (torch's zip format) plus ``pytorch_model.bin.index.json``."""
    names = [f"pytorch_model-{i:05d}-of-{count:05d}.bin" for i in range(1, count + 1)]
    shards = plan_shards(entries, count, max_bytes)
    for name, shard in zip(names, shards):
        with atomic_path(folder / name) as staging:
            torch.save({entry.name: make(entry) for entry in shard}, staging)
    _write_index(folder / "pytorch_model.bin.index.json", names, shards)
    return [folder / name for name in names]


def write_safetensors_shards(
    folder: Path, entries: Sequence[TensorEntry], make: MakeTensor, count: int, variant: str | None = VARIANT
) -> list[Path]:
    """``model.fp16-0000N-of-0000M.safetensors`` shards plus ``model.safetensors.index.fp16.json`` (diffusers names)."""
    stem = add_variant("model.x", variant).removesuffix(".x")
    names = [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    shards = plan_shards(entries, count)
    for name, shard in zip(names, shards):
        write_safetensors(folder / name, shard, make)
    _write_index(folder / add_variant("model.safetensors.index.json", variant), names, shards)
    return [folder / name for name in names]


def _write_index(path: Path, names: list[str], shards: list[list[TensorEntry]]) -> None:
    weight_map = {entry.name: name for name, shard in zip(names, shards) for entry in shard}
    total = sum(entry.nbytes for shard in shards for entry in shard)
    write_json(path, {"metadata": {"total_size": total}, "weight_map": weight_map})


# --- whole-model layouts -----------------------------------------------------

LAYOUTS = ("single", "official", "diffusers")
"""``official``: Kwai-Kolors/Kolors (7 fp16 ``.bin`` ChatGLM shards + index, fp16 UNet and VAE under plain names);
``diffusers``: Kwai-Kolors/Kolors-diffusers (fp16 variant names, 3 safetensors ChatGLM shards + fp16 index);
``single``: one ``model.safetensors`` ChatGLM file, plain names, dtypes as given."""
OFFICIAL_TEXT_ENCODER_SHARDS = 7
DIFFUSERS_TEXT_ENCODER_SHARDS = 3
CHATGLM_PREFIX = "transformer."  # the published .bin shards hold ChatGLM under its base-model prefix

Part = tuple[Sequence[TensorEntry], MakeTensor]


def write_kolors_weights(root: Path, layout: str, text_encoder: Part, unet: Part, vae: Part) -> list[Path]:
    """Write the three weight sets under ``root`` in ``layout``; returns the files written (configs not included).

    Entries are written with the dtypes they declare: the caller decides
    fp16 (the published layouts) or not.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r} (expected one of {LAYOUTS})")
    for part in ("text_encoder", "unet", "vae"):
        (root / part).mkdir(parents=True, exist_ok=True)
    variant = VARIANT if layout == "diffusers" else None
    written = []
    for part, (entries, make) in (("unet", unet), ("vae", vae)):
        path = root / part / add_variant("diffusion_pytorch_model.safetensors", variant)
        write_safetensors(path, entries, make)
        written.append(path)
    entries, make = text_encoder
    folder = root / "text_encoder"
    if layout == "single":
        write_safetensors(folder / "model.safetensors", entries, make)
        return [folder / "model.safetensors", *written]
    if layout == "diffusers":
        shards = write_safetensors_shards(folder, entries, make, DIFFUSERS_TEXT_ENCODER_SHARDS)
        return [folder / add_variant("model.safetensors.index.json", VARIANT), *shards, *written]
    by_name = {CHATGLM_PREFIX + entry.name: entry for entry in entries}
    prefixed = [TensorEntry(name, entry.shape, entry.dtype) for name, entry in by_name.items()]
    shards = write_bin_shards(
        folder, prefixed, lambda e: make(by_name[e.name]), OFFICIAL_TEXT_ENCODER_SHARDS, TRANSFORMERS_MAX_SHARD_BYTES
    )
    return [folder / "pytorch_model.bin.index.json", *shards, *written]
