"""``verify.json``: what the last ``kstory verify`` of a package found, kept beside ``kstory_package.json``.

Upload reads it to warn about a package that was never verified and to ask
for a flag before publishing one that failed. It names the package index it
checked by sha256, so a record left from an earlier build counts as missing.
It is not one of the package's hashed files and is not uploaded.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kstory.core.atomic import write_json
from kstory.core.hashing import sha256_file
from kstory.submissions.package import PACKAGE_FILE, VERIFY_FILE

FORMAT = "kstory-verify/1"


def write_verify_record(submission_dir: str | Path, report: Any) -> Path:
    """Record ``report`` (a ``VerifyReport``) in ``SUBMISSION/verify.json``; returns its path."""
    submission = Path(submission_dir)
    path = submission / VERIFY_FILE
    write_json(path, {
        "format": FORMAT,
        "verdict": report.verdict,
        "passed": bool(report.passed),
        "package_sha256": sha256_file(submission / PACKAGE_FILE),
        "verified_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "frames_identical": sum(1 for frame in report.frames if frame.identical),
        "frames": len(report.frames),
        "scores_match": report.scores_match,
    })
    return path


def verify_status(submission_dir: str | Path) -> str:
    """``passed``, ``failed`` or ``missing`` (never verified, unreadable, or verified before the last build)."""
    submission = Path(submission_dir)
    try:
        record = json.loads((submission / VERIFY_FILE).read_text(encoding="utf-8"))
        current = sha256_file(submission / PACKAGE_FILE)
    except (OSError, ValueError):
        return "missing"
    if not isinstance(record, dict) or record.get("format") != FORMAT or record.get("package_sha256") != current:
        return "missing"
    return "passed" if record.get("passed") is True else "failed"
