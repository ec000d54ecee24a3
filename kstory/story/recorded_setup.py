"""The networks a story was made with, found again from its manifest and checked by hash.

A re-roll and a candidate search both make new frames that must sit beside
the story's own, so they must use exactly the weights, LoRA, ControlNets,
device, dtype and memory profile the manifest records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.models import resolve_model
from kstory.story.controlnets import identify
from kstory.story.generate import Session, recorded_memory
from kstory.story.review import FINAL_LORA, checkpoint_lora


def verified(path: Path, sha256: str, what: str) -> Path:
    """``path`` if it holds the bytes the story was made with, else a KstoryError naming it."""
    if not path.is_file() or sha256_file(path) != sha256:
        raise KstoryError(f"{what} changed or is missing since the story was generated", path=path,
                          fix="restore it, or generate the whole story again")
    return path


def lora_file(out_dir: Path, lora: dict[str, Any]) -> Path:
    """The LoRA the story was made with: at its recorded path, or in the run's lora/ folder after a move
    (``lora/checkpoints/<name>/`` when the manifest names the picked checkpoint)."""
    recorded = Path(lora["path"])
    lora_dir = Path(out_dir).resolve().parent / "lora"
    moved = checkpoint_lora(lora_dir, lora["checkpoint"]) if lora.get("checkpoint") else lora_dir / FINAL_LORA
    for candidate in (recorded, moved):
        if candidate.is_file() and sha256_file(candidate) == lora["sha256"]:
            return candidate
    return verified(recorded, lora["sha256"], "LoRA")


def recorded_session(out_dir: Path, manifest: dict[str, Any], needed: set[str], *,
                     controlnets: Mapping[str, Path] | None = None,
                     cache_dir: Path | None = None, ip_adapter: Any = None) -> Callable[[], Session]:
    """Check everything the manifest records now (fast) and return a loader for the session (slow, on demand).

    ``needed`` names the ControlNets the frames to make use; ``controlnets`` may point at moved copies;
    ``ip_adapter`` is the recorded IP-Adapter, found by hash (kstory.story.reference_records).
    """
    weights = resolve_model(manifest["model"]["spec"], cache_dir)
    if weights.fingerprint != manifest["model"]["fingerprint"]:
        raise KstoryError(f"the base model {manifest['model']['spec']!r} changed since the story was generated",
                          path=weights.root, fix="restore those weights, or generate the whole story again")
    lora = manifest["lora"]
    lora_path = lora_file(out_dir, lora) if lora else None
    from kstory.core.lora_stack import check_loras, requests_from_records

    own_scale = (1.0 if lora["scale"] is None else lora["scale"]) if lora else None
    user_loras = check_loras(requests_from_records(manifest.get("loras") or [], where=out_dir), weights,
                             own_scale=own_scale)  # the user's LoRAs, found again by hash
    paths = {name: Path(cn["path"]) for name, cn in manifest["controlnets"].items()}
    paths.update({name: Path(p) for name, p in (controlnets or {}).items()})
    found = {name: identify(name, paths[name]) for name in sorted(needed)}
    for name, cn in found.items():
        if cn.sha256 != manifest["controlnets"][name]["sha256"]:
            raise KstoryError(f"ControlNet {name!r} is not the one the story was generated with", path=cn.path,
                              fix="point at the original weights (--controlnet NAME=PATH)")
    device = manifest["device"]
    if device == "cuda" and not torch.cuda.is_available():
        raise KstoryError("this story was generated on a GPU; new frames made on the CPU would not match its frames",
                          path=out_dir, fix="run this on a machine with a GPU, or generate the whole story again")

    def load_session() -> Session:
        return Session.load(weights, lora=lora_path, lora_scale=lora["scale"] if lora else None, controlnets=found,
                            device=device, torch_dtype=getattr(torch, manifest["dtype"]),
                            memory=recorded_memory(manifest), ip_adapter=ip_adapter, loras=user_loras)

    return load_session
