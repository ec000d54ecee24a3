"""The challenge's aesthetic predictor, in its two published forms, behind one interface.

* The organisers' form: a transformers folder
  (``AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE``) holding a
  ``CLIPVisionModelWithProjection`` and the ``layers.*`` MLP of
  ``simple-aesthetics-predictor``'s ``AestheticsPredictorV2Linear``, preprocessed
  by the folder's ``CLIPImageProcessor`` (the slow one, as their
  ``CLIPProcessor.from_pretrained`` picks).
* LAION's original form: open_clip ViT-L/14 with OpenAI's weights (QuickGELU
  forced, see :mod:`scoring.clip`) and the MLP ``.pth``.

Both compute ``mlp(e / |e|)`` on the projected image embedding ``e``; the score
of an image is the same whether it is alone or in a batch.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.scoring.clip import load_open_clip
from kstory.scoring.report import ModelInfo
from kstory.scoring.tiny import AESTHETIC_ARCHITECTURE, HEAD_LAYER_INDICES, aesthetic_head, cached_tiny, is_tiny

log = get_logger("score")

CHALLENGE_ID = "AI-ModelScope/aesthetics-predictor-v2-sac-logos-ava1-l14-linearMSE"
CHALLENGE_SPECS = ("kolors-challenge", CHALLENGE_ID)
DEFAULT_LAION_CLIP = "ViT-L-14:openai"
HEAD_SUFFIXES = (".pth", ".pt", ".safetensors")
_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_FIX = (f"use 'kolors-challenge' (downloads {CHALLENGE_ID}), 'tiny', a folder in that format "
        "(config.json naming AestheticsPredictorV2Linear + weights + preprocessor_config.json), "
        "or LAION's MLP file (e.g. sac+logos+ava1-l14-linearMSE.pth) with --aesthetic-clip")


@dataclass
class AestheticModel:
    """Preprocess one RGB image, then score a batch of them."""

    preprocess: Callable[[object], torch.Tensor]
    embed: Callable[[torch.Tensor], torch.Tensor]  # pixels -> projected image embeddings
    head: torch.nn.Module
    info: ModelInfo
    weight_files: list[Path]

    @torch.inference_mode()
    def score(self, pixels: torch.Tensor) -> torch.Tensor:
        embeds = self.embed(pixels)
        return self.head(embeds / embeds.norm(dim=-1, keepdim=True))[:, 0]


def download_challenge_model(cache_dir: Path) -> Path:
    """Fetch the organisers' predictor folder from ModelScope, as their scoring code does."""
    from modelscope import snapshot_download

    try:
        return Path(snapshot_download(CHALLENGE_ID, cache_dir=str(cache_dir / "modelscope")))
    except Exception as exc:  # noqa: BLE001 - ModelScope raises many types for network and hub failures
        raise KstoryError(f"could not download {CHALLENGE_ID} from ModelScope: {exc}",
                          fix="check the network, or download the folder yourself and pass its path") from None


def load_aesthetic_model(
    spec: str | Path, *, device: torch.device, cache_dir: Path, clip: str | Path = DEFAULT_LAION_CLIP
) -> AestheticModel:
    """``tiny``, ``kolors-challenge``, a predictor folder, or a LAION MLP file (with ``clip`` for its tower)."""
    text = str(spec)
    if text == "tiny":
        return load_transformers_predictor(cached_tiny("aesthetic", cache_dir), device=device, identity="kstory/tiny-aesthetic")
    if text in CHALLENGE_SPECS:
        return load_transformers_predictor(download_challenge_model(cache_dir), device=device, identity=CHALLENGE_ID)
    path = Path(text).expanduser()
    if path.is_dir():
        return load_transformers_predictor(path, device=device, identity=str(path))
    if path.is_file() and path.suffix in HEAD_SUFFIXES:
        return load_laion_predictor(path, clip=clip, device=device, cache_dir=cache_dir)
    raise KstoryError("not an aesthetic predictor", path=path, fix=_FIX)


def _read_config(folder: Path) -> dict:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KstoryError("no config.json: not a transformers aesthetic predictor folder", path=folder, fix=_FIX) from None
    except json.JSONDecodeError as exc:
        raise KstoryError(f"config.json is not valid JSON ({exc})", path=folder, fix=_FIX) from None
    if AESTHETIC_ARCHITECTURE not in (config.get("architectures") or []):
        raise KstoryError(f"config.json names {config.get('architectures')}, not ['{AESTHETIC_ARCHITECTURE}']",
                          path=folder, fix=_FIX)
    return config


def _weight_files(folder: Path) -> list[Path]:
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            if name.endswith(".index.json"):
                index = json.loads((folder / name).read_text(encoding="utf-8"))
                return sorted({folder / shard for shard in index["weight_map"].values()})
            return [folder / name]
    raise KstoryError("no weights (model.safetensors or pytorch_model.bin)", path=folder, fix=_FIX)


def _read_tensors(files: list[Path], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefix``, without the prefix; .bin files are read weights-only."""
    from safetensors import safe_open

    found: dict[str, torch.Tensor] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(file, framework="pt") as handle:
                found.update({k[len(prefix):]: handle.get_tensor(k) for k in handle.keys() if k.startswith(prefix)})
        else:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            found.update({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return found


def _load_head(tensors: dict[str, torch.Tensor], width: int, source: Path) -> torch.nn.Sequential:
    head = aesthetic_head(width)
    try:
        head.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        expected = ", ".join(f"layers.{i}" for i in HEAD_LAYER_INDICES)
        raise KstoryError(f"the MLP head does not fit a {width}-d embedding ({expected} expected): "
                          f"{str(exc).splitlines()[0]}", path=source, fix=_FIX) from None
    return head.eval()


def load_transformers_predictor(folder: Path, *, device: torch.device, identity: str) -> AestheticModel:
    """Load the organisers' format: any CLIP vision width, checked before any image is decoded."""
    import transformers
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    config = _read_config(folder)
    files = _weight_files(folder)
    if not (folder / "preprocessor_config.json").is_file():
        raise KstoryError("no preprocessor_config.json (the CLIP preprocessing)", path=folder, fix=_FIX)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the head's keys are "unused" by the tower: expected
    try:
        tower, loading = CLIPVisionModelWithProjection.from_pretrained(
            folder, output_loading_info=True, torch_dtype=torch.float32)
        processor = CLIPImageProcessor.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise KstoryError(f"could not load the predictor: {str(exc).splitlines()[0]}", path=folder, fix=_FIX) from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    if loading["missing_keys"] or loading["mismatched_keys"]:
        bad = (loading["missing_keys"] or [k for k, *_ in loading["mismatched_keys"]])[:3]
        raise KstoryError(f"the weights do not fit config.json (e.g. {bad})", path=folder, fix=_FIX)
    head = _load_head(_read_tensors(files, "layers."), config.get("projection_dim", tower.config.projection_dim), folder)
    tower.eval().to(device)

    def preprocess(image) -> torch.Tensor:
        return torch.from_numpy(processor(images=image, return_tensors="np")["pixel_values"][0])

    def embed(pixels: torch.Tensor) -> torch.Tensor:
        return tower(pixel_values=pixels).image_embeds

    info = ModelInfo(role="aesthetic", form="transformers", identity=identity, random_weights=is_tiny(folder))
    return AestheticModel(preprocess, embed, head.to(device), info, [folder / "config.json", *files])


def load_laion_predictor(head_file: Path, *, clip: str | Path, device: torch.device, cache_dir: Path) -> AestheticModel:
    """LAION's form: an open_clip tower with OpenAI weights (so QuickGELU) and the MLP file."""
    tower = load_open_clip(clip, device=device, cache_dir=cache_dir, force_quick_gelu=True)
    try:
        tensors = _read_tensors([head_file], "")
    except Exception as exc:  # noqa: BLE001 - torch/safetensors raise many types for a file that is not theirs
        raise KstoryError(f"not a readable weights file ({type(exc).__name__}: {exc})", path=head_file, fix=_FIX) from None
    tensors = {k.removeprefix("layers."): v for k, v in tensors.items()}
    head = _load_head(tensors, tower.model.visual.output_dim, head_file)
    info = ModelInfo(role="aesthetic", form="open_clip+mlp", identity=f"{tower.info.identity} + {head_file}",
                     quick_gelu=tower.info.quick_gelu, random_weights=tower.info.random_weights)
    return AestheticModel(tower.preprocess, tower.model.encode_image, head.to(device), info,
                          [*tower.weight_files, head_file])
