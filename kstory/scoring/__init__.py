"""scoring stage: the challenge's aesthetic gate, exactly, plus coherence and prompt fit (docs/scoring.md).

``score_images`` writes ``scores.json`` (see docs/run-directory.md); the
heavy names (torch, transformers, open_clip) load on first use, so importing
this package is cheap.
"""

from __future__ import annotations

from typing import Any

from kstory.core.lazy import lazy_attributes

PASS_EXIT = 0
GATE_FAILED_EXIT = 3  # distinct from 1 (unexpected error) and 2 (a problem the user must fix)

_LAZY = {
    "score_images": "kstory.scoring.score",
    "ScoreReport": "kstory.scoring.report",
    "render_table": "kstory.scoring.table",
    "load_prompts": "kstory.scoring.prompts",
    "build_tiny_aesthetic_model": "kstory.scoring.tiny",
    "build_tiny_clip_model": "kstory.scoring.tiny",
}

__all__ = ["GATE_FAILED_EXIT", "PASS_EXIT", "exit_status", *_LAZY]


def exit_status(report: Any) -> int:
    """The process exit status for a report, so scripts can gate on ``kstory score``."""
    return PASS_EXIT if report.passed else GATE_FAILED_EXIT


__getattr__ = lazy_attributes(__name__, _LAZY)
