"""Kolors weights: resolve a spec to local files, build the tiny test model, load the pipeline.

``resolve_model`` is cheap to import; the names that need torch and
DiffSynth (seconds to import) are loaded on first use.
"""

from __future__ import annotations

from kstory.core.lazy import lazy_attributes
from kstory.core.models.resolve import KolorsWeights, default_cache_dir, resolve_model

_LAZY = {
    "load_kolors_pipeline": "kstory.core.models.pipeline",
    "load_kolors_model_manager": "kstory.core.models.pipeline",
    "kolors_models": "kstory.core.models.pipeline",
    "KolorsModels": "kstory.core.models.pipeline",
    "build_tiny_kolors": "kstory.core.models.tiny",
    "TinyKolorsSpec": "kstory.core.models.tiny",
}

__all__ = ["KolorsWeights", "default_cache_dir", "resolve_model", *_LAZY]


__getattr__ = lazy_attributes(__name__, _LAZY)
