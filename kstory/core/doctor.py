"""``kstory doctor``: the facts a bug report needs, in one screen."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

PACKAGES = (
    "kstory", "torch", "torchvision", "diffsynth", "transformers", "huggingface_hub", "datasets",
    "lightning", "peft", "py-data-juicer", "modelscope", "open_clip_torch", "streamlit",
)


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def memory_lines() -> list[str]:
    """The memory plan ``auto`` makes on this machine for the full Kolors (kstory.core.memory)."""
    from kstory.core.memory import doctor_lines

    return ["memory plan (Kwai-Kolors/Kolors, 1024 px, auto):", *("  " + line for line in doctor_lines())]


def report() -> str:
    """Versions, accelerator, torchvision mode, cache location and the memory plan."""
    import torch

    from kstory.core.torchvision_compat import ensure_torchvision_ops

    patched = ensure_torchvision_ops()
    lines = [f"python       {sys.version.split()[0]} on {platform.platform()}"]
    lines += [f"{name:<16} {_version(name)}" for name in PACKAGES]
    lines.append(f"cuda         {'available: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available (CPU only)'}")
    lines.append("torchvision  " + ("compiled ops missing: kstory's CPU fallback for nms is active"
                                    if patched else "own compiled ops in use"))
    lines.append(f"model cache  {os.environ.get('KSTORY_CACHE', '~/.cache/kstory (default)')}")
    lines += memory_lines()
    return "\n".join(lines)
