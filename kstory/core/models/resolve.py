"""Turn a model spec (``kolors``, ``tiny`` or a folder) into checked local weight paths.

Everything that can go wrong with weights (missing file, half download,
pickle that could run code) is reported here with the file and the fix,
before DiffSynth spends minutes loading and fails somewhere deep inside.
This module imports neither torch nor DiffSynth unless it has to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

from kstory.core.errors import KstoryError

KOLORS_ID = "Kwai-Kolors/Kolors"
FP16_FIX_VAE_ID = "AI-ModelScope/sdxl-vae-fp16-fix"
TINY_DIR = "tiny-kolors-v1"
TINY_IDENTITY = "kstory/tiny-kolors"
SPEC_FILE = "kstory_tiny.json"  # marks a folder as a tiny model (written by kstory.models.tiny)

# Only what DiffSynth loads: the ChatGLM weights and config, the UNet, the VAE.
KOLORS_PATTERNS = [
    "text_encoder/config.json",
    "text_encoder/pytorch_model*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
FP16_FIX_VAE_PATTERNS = ["diffusion_pytorch_model.safetensors"]

# Per slot, the accepted file names in order of preference. Pickle (.bin)
# files are accepted only if torch can load them with weights_only=True.
_TEXT_ENCODER_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
_SINGLE_FILE_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_LAYOUT_FIX = (
    "point to a folder laid out like Kwai-Kolors/Kolors (text_encoder/, unet/, vae/), "
    "or use 'kolors' to download it or 'tiny' for the offline test model"
)
_PICKLE_FIX = "convert it to .safetensors, or use the published file (its tensors load with weights_only=True)"


@dataclass(frozen=True)
class KolorsWeights:
    """Local, validated Kolors weights.

    ``fingerprint`` identifies the content (a hash over each weight file's
    layout name, size, safetensors header and 64 pages sampled across the
    file), so it changes when weights are replaced or fine-tuned and can key
    caches of latents or prompt embeddings.
    """

    root: Path
    text_encoder: Path  # folder, loaded by DiffSynth's ChatGLMModel.from_pretrained
    unet: Path
    vae: Path
    identity: str
    is_tiny: bool
    fingerprint: str


def default_cache_dir() -> Path:
    """``$KSTORY_CACHE`` or ``~/.cache/kstory``."""
    return Path(os.environ.get("KSTORY_CACHE") or Path.home() / ".cache" / "kstory").expanduser()


def resolve_model(spec: str, cache_dir: Path | None = None, *, fp16_fix_vae: bool = False) -> KolorsWeights:
    """Resolve ``kolors`` (download), ``tiny`` (build once, offline) or a local folder.

    ``fp16_fix_vae`` swaps in the fp16-fix SDXL VAE; it only applies to
    ``kolors`` (DiffSynth runs the SDXL VAE in float32 anyway, see docs/models.md).
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if fp16_fix_vae and spec != "kolors":
        problem = f"the fp16-fix VAE option only applies to the 'kolors' spec, not {spec!r}"
        raise KstoryError(problem, fix="drop the option or use 'kolors'")
    if spec == "kolors":
        return _resolve_kolors(cache_dir, fp16_fix_vae)
    if spec == "tiny":
        return _resolve_tiny(cache_dir)
    return resolve_local(Path(spec))


def resolve_local(root: Path) -> KolorsWeights:
    """Validate a folder in the published Kolors layout (a tiny build counts too)."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        problem = "model path is not a folder" if root.exists() else "model folder does not exist"
        raise KstoryError(problem, path=root, fix=_LAYOUT_FIX)
    unet, vae = _single_file(root / "unet"), _single_file(root / "vae")
    files = [*_text_encoder_files(root), unet, vae]
    for path in files:
        _refuse_unsafe_pickle(path)
    fingerprint = _fingerprint({path.relative_to(root).as_posix(): path for path in files})
    is_tiny = (root / SPEC_FILE).is_file()
    identity = f"{TINY_IDENTITY}@{fingerprint[:12]}" if is_tiny else f"local:{root}"
    return KolorsWeights(root, root / "text_encoder", unet, vae, identity, is_tiny, fingerprint)


def download_snapshot(model_id: str, cache_dir: Path, allow_patterns: list[str]) -> Path:
    """Download (or reuse) a ModelScope snapshot; the only network access in kstory's model code.

    Offline, a snapshot downloaded earlier is used as is (``resolve_local``
    then checks it is complete).
    """
    from modelscope import snapshot_download

    options = {"cache_dir": str(cache_dir), "allow_patterns": allow_patterns}
    try:
        return Path(snapshot_download(model_id, **options))
    except Exception as error:  # modelscope raises many types for "offline", "not found", "disk full"
        with contextlib.suppress(Exception):
            return Path(snapshot_download(model_id, local_files_only=True, **options))
        raise KstoryError(
            f"could not download {model_id} from ModelScope: {error}",
            path=cache_dir,
            fix=f"check the network and disk space, or download {model_id} yourself and pass its folder instead",
        ) from error


def _resolve_kolors(cache_dir: Path, fp16_fix_vae: bool) -> KolorsWeights:
    modelscope_cache = cache_dir / "modelscope"
    weights = resolve_local(download_snapshot(KOLORS_ID, modelscope_cache, KOLORS_PATTERNS))
    if not fp16_fix_vae:
        return replace(weights, identity=KOLORS_ID)
    vae = _single_file(download_snapshot(FP16_FIX_VAE_ID, modelscope_cache, FP16_FIX_VAE_PATTERNS))
    kept = [*_text_encoder_files(weights.root), weights.unet]
    files = {path.relative_to(weights.root).as_posix(): path for path in kept}
    files["vae/" + vae.name] = vae
    return replace(weights, vae=vae, identity=f"{KOLORS_ID}+{FP16_FIX_VAE_ID}", fingerprint=_fingerprint(files))


def _resolve_tiny(cache_dir: Path) -> KolorsWeights:
    from kstory.core.models.tiny import TinyKolorsSpec, build_tiny_kolors, is_complete

    root, spec = cache_dir / TINY_DIR, TinyKolorsSpec()
    if not is_complete(root, spec):
        if root.exists():
            shutil.rmtree(root)  # our own cache entry, half-written or from another spec
        try:
            build_tiny_kolors(root, spec)
        except OSError:
            if not is_complete(root, spec):  # not just another process finishing first
                raise
    return resolve_local(root)


def _text_encoder_files(root: Path) -> list[Path]:
    """config.json plus the weight files (an index and every shard it lists, or one file)."""
    folder = root / "text_encoder"
    config = folder / "config.json"
    if not config.is_file():
        raise KstoryError("missing text encoder config", path=config, fix=_LAYOUT_FIX)
    for name in _TEXT_ENCODER_NAMES:
        path = folder / name
        if not path.is_file():
            continue
        if not name.endswith(".index.json"):
            return [config, path]
        try:
            shards = sorted(set(json.loads(path.read_text(encoding="utf-8"))["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            fix = "download the text encoder again"
            raise KstoryError(f"unreadable shard index: {error}", path=path, fix=fix) from error
        for shard in shards:
            if not (folder / shard).is_file():
                raise KstoryError(
                    "missing text encoder shard listed in the index",
                    path=folder / shard,
                    fix="download the text encoder again (this download is incomplete)",
                )
        return [config, path, *(folder / shard for shard in shards)]
    raise KstoryError(
        f"missing text encoder weights (expected one of: {', '.join(_TEXT_ENCODER_NAMES)})",
        path=folder / _TEXT_ENCODER_NAMES[1],
        fix=_LAYOUT_FIX,
    )


def _single_file(folder: Path) -> Path:
    for name in _SINGLE_FILE_NAMES:
        if (folder / name).is_file():
            return folder / name
    expected = " or ".join(_SINGLE_FILE_NAMES)
    raise KstoryError(f"missing weights (expected {expected})", path=folder / _SINGLE_FILE_NAMES[0], fix=_LAYOUT_FIX)


def _refuse_unsafe_pickle(path: Path) -> None:
    """Pickle can run code on load; accept it only where torch's weights_only loader can read it."""
    if path.suffix not in _PICKLE_SUFFIXES:
        return
    if not zipfile.is_zipfile(path):
        problem = "refusing pickle weights in the legacy (non-zip) format: they cannot be checked safely"
        raise KstoryError(problem, path=path, fix=_PICKLE_FIX)
    import torch

    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError for forbidden globals, RuntimeError for broken archives
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        problem = f"refusing pickle weights that do not load with weights_only=True ({reason})"
        raise KstoryError(problem, path=path, fix=_PICKLE_FIX) from error


def _fingerprint(files: dict[str, Path]) -> str:
    """Hash of each file's layout name and sampled content (kstory.hashing.sampled_digest): cheap on 17 GB,
    and a fine-tune of the same size changes it."""
    from kstory.core.hashing import sampled_digest

    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(f"{name}\0{sampled_digest(path)}\0".encode())
    return digest.hexdigest()
