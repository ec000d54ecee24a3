"""Turn a model spec (``kolors``, ``tiny`` or a folder) into checked local weight paths.

Everything that can go wrong with weights (missing file, half download,
pickle that could run code) is reported here with the file and the fix,
before DiffSynth spends minutes loading and fails somewhere deep inside.
This module imports neither torch nor DiffSynth unless it has to.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import replace
from pathlib import Path

from kstory.core.errors import KstoryError
from kstory.core.models import files as layout
from kstory.core.models.weights import SPEC_FILE, KolorsWeights  # noqa: F401  (re-exported)

KOLORS_ID = "Kwai-Kolors/Kolors"
FP16_FIX_VAE_ID = "AI-ModelScope/sdxl-vae-fp16-fix"
TINY_DIR = "tiny-kolors-v1"
TINY_IDENTITY = "kstory/tiny-kolors"

# Only what DiffSynth loads: the ChatGLM weights and config, the UNet, the VAE.
KOLORS_PATTERNS = [
    "text_encoder/config.json",
    "text_encoder/pytorch_model*",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
]
FP16_FIX_VAE_PATTERNS = ["diffusion_pytorch_model.safetensors"]

# Pickle (.bin) files are accepted only if torch can load them with weights_only=True.
_PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_LAYOUT_FIX = (
    "point to a folder laid out like Kwai-Kolors/Kolors (text_encoder/, unet/, vae/), "
    "or use 'kolors' to download it or 'tiny' for the offline test model"
)
_PICKLE_FIX = "convert it to .safetensors, or use the published file (its tensors load with weights_only=True)"


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
    text_encoder = layout.text_encoder_files(root / "text_encoder", _LAYOUT_FIX)
    unet, vae = _single_file(root / "unet"), _single_file(root / "vae")
    if layout.unet_input_channels(unet) == layout.INPAINT_UNET_CHANNELS:
        raise KstoryError("this UNet has 9 input channels: it is Kolors-Inpainting's, not the base Kolors UNet",
                          path=unet, fix="give the base Kolors folder as the model, and the inpainting folder "
                          "only to `kstory inpaint --inpaint-model`")
    dtypes = {path: _checked_dtypes(path) for path in (*text_encoder.shards, unet, vae)}
    files = [text_encoder.config, *([text_encoder.index] if text_encoder.index else []), *dtypes]
    fingerprint = _fingerprint({path.relative_to(root).as_posix(): path for path in files})
    is_tiny = (root / SPEC_FILE).is_file()
    identity = f"{TINY_IDENTITY}@{fingerprint[:12]}" if is_tiny else f"local:{root}"
    text_encoder_bytes: dict[str, int] = {}
    for shard in text_encoder.shards:
        for name, size in dtypes[shard].items():
            text_encoder_bytes[name] = text_encoder_bytes.get(name, 0) + size
    return KolorsWeights(
        root, root / "text_encoder", unet, vae, identity, is_tiny, fingerprint,
        text_encoder_dtype=layout.main_dtype(text_encoder_bytes),
        unet_dtype=layout.main_dtype(dtypes[unet]),
        vae_dtype=layout.main_dtype(dtypes[vae]),
        text_encoder_variant=text_encoder.variant,
    )


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
    vae_dtype = layout.main_dtype(_checked_dtypes(vae))
    text_encoder = layout.text_encoder_files(weights.root / "text_encoder", _LAYOUT_FIX)
    kept = [text_encoder.config, *([text_encoder.index] if text_encoder.index else []), *text_encoder.shards, weights.unet]
    files = {path.relative_to(weights.root).as_posix(): path for path in kept}
    files["vae/" + vae.name] = vae
    identity, fingerprint = f"{KOLORS_ID}+{FP16_FIX_VAE_ID}", _fingerprint(files)
    return replace(weights, vae=vae, identity=identity, fingerprint=fingerprint, vae_dtype=vae_dtype)


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


def _single_file(folder: Path) -> Path:
    return layout.single_file(folder, _LAYOUT_FIX)


def _checked_dtypes(path: Path) -> dict[str, int]:
    """Bytes per dtype of a weight file, after checking it is whole (and, for pickles, safe)."""
    if path.suffix == ".safetensors":
        return layout.safetensors_dtypes(path)
    if path.suffix not in _PICKLE_SUFFIXES:
        return {}
    return _refuse_unsafe_pickle(path)


def _refuse_unsafe_pickle(path: Path) -> dict[str, int]:
    """Pickle can run code on load; accept it only where torch's weights_only loader can read it."""
    if not layout.check_zip_whole(path):
        problem = "refusing pickle weights in the legacy (non-zip) format: they cannot be checked safely"
        raise KstoryError(problem, path=path, fix=_PICKLE_FIX)
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # UnpicklingError for forbidden globals, RuntimeError for broken archives
        reason = (str(error).strip() or type(error).__name__).splitlines()[0]
        problem = f"refusing pickle weights that do not load with weights_only=True ({reason})"
        raise KstoryError(problem, path=path, fix=_PICKLE_FIX) from error
    counts: dict[str, int] = {}
    for value in loaded.values() if isinstance(loaded, dict) else ():
        if isinstance(value, torch.Tensor):
            name = str(value.dtype).removeprefix("torch.")
            counts[name] = counts.get(name, 0) + value.numel() * value.element_size()
    return counts


def _fingerprint(files: dict[str, Path]) -> str:
    """Hash of each file's layout name and sampled content (kstory.hashing.sampled_digest): cheap on 17 GB,
    and a fine-tune of the same size changes it."""
    from kstory.core.hashing import sampled_digest

    digest = hashlib.sha256()
    for name, path in sorted(files.items()):
        digest.update(f"{name}\0{sampled_digest(path)}\0".encode())
    return digest.hexdigest()
