"""submissions stage (see docs/run-directory.md for the files it reads and writes, docs/submissions.md for the package).

Exports the LoRA for diffusers and kohya/WebUI/ComfyUI, builds the ModelScope
model repo (``runs/<name>/submission/``), verifies a package by regenerating
it, and uploads it with the ``modelscope`` client. Heavy imports load on first use.
"""

from __future__ import annotations

import kstory  # noqa: F401  (installs the torchvision import fix before DiffSynth loads)
from kstory.lazy import lazy_attributes

_LAZY = {
    "export_lora": "submissions.lora_export",
    "build_package": "submissions.package",
    "validate_model_name": "submissions.naming",
    "verify_package": "submissions.verify",
    "VerifyReport": "submissions.verify",
    "upload_package": "submissions.upload",
    "UploadResult": "submissions.upload",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
