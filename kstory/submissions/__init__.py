"""submissions stage (see docs/run-directory.md for the files it reads and writes, docs/submissions.md for the package).

Exports the LoRA for diffusers and ComfyUI (kohya-style keys), builds the ModelScope
model repo (``runs/<name>/submission/``), verifies a package by regenerating
it, and uploads it with the ``modelscope`` client. Heavy imports load on first use.
"""

from __future__ import annotations

import kstory  # noqa: F401  (installs the torchvision import fix before DiffSynth loads)
from kstory.core.lazy import lazy_attributes

_LAZY = {
    "export_lora": "kstory.submissions.lora_export",
    "build_package": "kstory.submissions.package",
    "validate_model_name": "kstory.submissions.naming",
    "verify_package": "kstory.submissions.verify",
    "VerifyReport": "kstory.submissions.verify",
    "upload_package": "kstory.submissions.upload",
    "UploadResult": "kstory.submissions.upload",
}

__all__ = list(_LAZY)

__getattr__ = lazy_attributes(__name__, _LAZY)
