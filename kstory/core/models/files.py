"""Which files a Kolors folder's weights are in, and whether each one is whole.

The published layouts name the same weights differently (Kwai-Kolors/Kolors:
``.bin`` shards with an index; Kolors-diffusers: ``fp16`` variant names and
safetensors shards), and a half-finished download looks like a model until a
loader fails minutes later deep inside torch. So the names are looked up here
in the order transformers and DiffSynth would load them, and every file is
checked against its own framing (safetensors header vs file size, zip central
directory) before anything loads. The checks read headers only: cheap on 17 GB.
"""

from __future__ import annotations

import json
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

from kstory.core.errors import KstoryError

VARIANT = "fp16"
BASE_UNET_CHANNELS = 4  # a text-to-image UNet's input: the latents
INPAINT_UNET_CHANNELS = 9  # Kolors-Inpainting's: latents, the mask, the masked picture's latents  # the only variant the published Kolors layouts use
_REDOWNLOAD = "download this file again (the download is incomplete or damaged)"
# transformers' own order for a folder: single safetensors, its index, single .bin, its index.
_TEXT_ENCODER_KINDS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_SINGLE_FILE_NAMES = (
    "diffusion_pytorch_model.safetensors",
    f"diffusion_pytorch_model.{VARIANT}.safetensors",
    "diffusion_pytorch_model.bin",
    f"diffusion_pytorch_model.{VARIANT}.bin",
)
_SHARD = re.compile(r"^(?P<stem>model|pytorch_model)(?:\.(?P<variant>\w+))?-\d{5}-of-\d{5}\.(?P<ext>safetensors|bin)$")
_SAFETENSORS_DTYPES = {
    "F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}


def add_variant(name: str, variant: str | None) -> str:
    """``model.safetensors`` -> ``model.fp16.safetensors`` (the token goes before the last suffix)."""
    if variant is None:
        return name
    stem, suffix = name.rsplit(".", 1)
    return f"{stem}.{variant}.{suffix}"


@dataclass(frozen=True)
class TextEncoderFiles:
    """The ChatGLM weight files of a ``text_encoder/`` folder and the variant transformers needs to find them."""

    config: Path
    index: Path | None
    shards: tuple[Path, ...]  # one file when not sharded
    variant: str | None


def text_encoder_files(folder: Path, fix: str) -> TextEncoderFiles:
    """The weights transformers' ``from_pretrained`` would load from ``folder``; missing ones are named."""
    config = folder / "config.json"
    if not config.is_file():
        raise KstoryError("missing text encoder config", path=config, fix=fix)
    for variant in (None, VARIANT):
        for kind in _TEXT_ENCODER_KINDS:
            path = folder / add_variant(kind, variant)
            if not path.is_file():
                continue
            if not kind.endswith(".index.json"):
                return TextEncoderFiles(config, None, (path,), variant)
            return TextEncoderFiles(config, path, _indexed_shards(path), variant)
    orphans = sorted(p.name for p in folder.glob("*") if _SHARD.match(p.name)) if folder.is_dir() else []
    if orphans:
        shard = _SHARD.match(orphans[0])
        assert shard is not None
        kind = "model.safetensors.index.json" if shard["ext"] == "safetensors" else "pytorch_model.bin.index.json"
        index = folder / add_variant(kind, shard["variant"])
        problem = f"text encoder shards ({orphans[0]}, ...) without the index that lists them"
        raise KstoryError(problem, path=index, fix=_REDOWNLOAD)
    expected = ", ".join(_TEXT_ENCODER_KINDS)
    raise KstoryError(
        f"missing text encoder weights (expected one of: {expected}, or their {VARIANT} variants)",
        path=folder / _TEXT_ENCODER_KINDS[0],
        fix=fix,
    )


def _indexed_shards(index: Path) -> tuple[Path, ...]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, AttributeError, TypeError) as error:
        raise KstoryError(f"unreadable shard index: {error}", path=index, fix=_REDOWNLOAD) from error
    if not names:
        raise KstoryError("shard index lists no weights", path=index, fix=_REDOWNLOAD)
    shards = tuple(index.parent / name for name in names)
    for shard in shards:
        if not shard.is_file():
            raise KstoryError(
                "missing text encoder shard listed in the index",
                path=shard,
                fix="download the text encoder again (this download is incomplete)",
            )
    return shards


def single_file(folder: Path, fix: str) -> Path:
    """The UNet or VAE weight file of ``folder``, plain name first, then the fp16 variant."""
    for name in _SINGLE_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    expected = " or ".join(_SINGLE_FILE_NAMES)
    raise KstoryError(f"missing weights (expected {expected})", path=folder / _SINGLE_FILE_NAMES[0], fix=fix)


def safetensors_dtypes(path: Path) -> dict[str, int]:
    """Bytes per dtype from a safetensors header, after checking the file is as long as the header says.

    A download cut short keeps its header, so a short file is caught here
    without reading any tensor data.
    """
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise KstoryError(f"truncated safetensors file ({size} bytes, no header)", path=path, fix=_REDOWNLOAD)
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            problem = f"truncated safetensors file: its header alone needs {8 + header_len} bytes, the file has {size}"
            raise KstoryError(problem, path=path, fix=_REDOWNLOAD)
        try:
            header = json.loads(handle.read(header_len))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise KstoryError(f"unreadable safetensors header: {error}", path=path, fix=_REDOWNLOAD) from error
    expected = 8 + header_len + end
    if size != expected:
        problem = (
            f"truncated safetensors file: its header describes {expected} bytes, the file has {size}"
            if size < expected
            else f"damaged safetensors file: {size - expected} bytes more than its header describes"
        )
        raise KstoryError(problem, path=path, fix=_REDOWNLOAD)
    counts: dict[str, int] = {}
    for info in tensors.values():
        name = _SAFETENSORS_DTYPES.get(info["dtype"], info["dtype"].lower())
        counts[name] = counts.get(name, 0) + int(info["data_offsets"][1]) - int(info["data_offsets"][0])
    return counts


def unet_input_channels(path: Path) -> int | None:
    """The input channels of a diffusers UNet's ``conv_in`` from its safetensors header (None: not readable so).

    4 is a text-to-image UNet, 9 an inpainting one (latents, mask, masked-image
    latents); only the header is read, so telling them apart is cheap on 5 GB.
    """
    if path.suffix != ".safetensors":
        return None
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            info = json.loads(handle.read(header_len)).get("conv_in.weight")
    except (OSError, ValueError, struct.error):
        return None
    shape = info.get("shape") if isinstance(info, dict) else None
    return int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else None


def check_zip_whole(path: Path) -> bool:
    """False for a legacy (non-zip) pickle; raises if it is a zip archive cut short or damaged.

    torch's zip format keeps its central directory at the end of the file, so
    a truncated download starts like a zip archive but has none.
    """
    with open(path, "rb") as handle:
        starts_like_zip = handle.read(4) == b"PK\x03\x04"
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                size = path.stat().st_size
                for info in archive.infolist():
                    if info.header_offset + info.compress_size > size:
                        raise zipfile.BadZipFile(f"{info.filename} runs past the end of the file")
        except zipfile.BadZipFile as error:
            raise KstoryError(f"damaged zip archive: {error}", path=path, fix=_REDOWNLOAD) from error
        return True
    if starts_like_zip:
        problem = "truncated .bin file: it starts as a zip archive but its central directory is missing"
        raise KstoryError(problem, path=path, fix=_REDOWNLOAD)
    return False


def main_dtype(counts: dict[str, int]) -> str:
    """The floating dtype holding the most bytes (what a loader must plan memory for)."""
    floats = {name: size for name, size in counts.items() if name.startswith(("float", "bfloat"))}
    pool = floats or counts
    return max(pool, key=lambda name: pool[name]) if pool else "unknown"
