"""report.json (one entry per input sample: kept, or dropped by what, measuring what) and report.md.

The schema is documented in docs/data-prep.md; bump SCHEMA_VERSION when it changes.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kstory.prep import juicer, validate
from kstory.prep.juicer import JuicerRun
from kstory.prep.recipe import Recipe
from kstory.prep.sources import Scan
from kstory.prep.validate import Check
from kstory.core.atomic import write_json, write_text

SCHEMA_VERSION = 2  # 2: path_outside_dataset, unsupported_pixel_values, caption_cleaned, file.scaled_from
PRE_CHECKS = {
    "path_outside_dataset": "the listed path (or its symlink) leads out of the dataset folder; never read",
    "file_not_found": "the listed file does not exist",
    "missing_caption": "no caption given (no metadata row / no .txt)",
    "empty_caption": "caption is empty or only whitespace",
    "not_an_image": "Pillow cannot identify the file as a picture",
    "corrupt_image": "header or pixel data is damaged or truncated",
    "too_many_pixels": "header claims more pixels than kstory.max_image_pixels",
    "unsupported_pixel_values": "32-bit integer or float pixels outside the ranges with a known white level",
    "duplicate_name": "another sample has the same file stem",
}
CAPTION_CLEANING = "caption_cleaned"
CAPTION_CLEANING_RULE = "Unicode NFC; bidi controls, BOM and non-whitespace control characters removed"


def build_report(
    *,
    source: str,
    scan: Scan,
    recipe: Recipe,
    trigger_word: str | None,
    checks: Sequence[Check],
    run: JuicerRun | None,
    placed: dict[str, str],
    final_captions: dict[str, str],
) -> dict[str, Any]:
    """Assemble the report from the pre-checks, Data-Juicer's traces and the written training set."""
    params: dict[str, Any] = {}
    for name, args in recipe.ops:
        params.setdefault(name, args)
    kept_rows = {row["id"]: row for row in run.kept} if run else {}
    samples = [_entry(check, run, params, kept_rows, placed, final_captions) for check in checks]
    dropped_by = Counter(entry["op"] for entry in samples if entry["status"] == "dropped")
    edited = Counter(op for edits in (run.caption_edits.values() if run else []) for op in edits)
    limits = {"too_many_pixels": {"max_image_pixels": recipe.max_image_pixels}}
    ops = [
        {
            "stage": validate.STAGE,
            "name": reason,
            "rule": rule,
            "threshold": limits.get(reason, {}),
            "dropped": dropped_by[reason],
        }
        for reason, rule in PRE_CHECKS.items()
    ]
    cleaned = sum(bool(check.caption_cleaned) for check in checks)
    ops.append(
        {
            "stage": validate.STAGE,
            "name": CAPTION_CLEANING,
            "rule": CAPTION_CLEANING_RULE,
            "threshold": {},
            "dropped": 0,
            "captions_changed": cleaned,
        }
    )
    seen: set[str] = set()
    for name, args in recipe.ops:  # a repeated op's counts go to its first entry
        counts = {"dropped": 0} if name in seen else {"dropped": dropped_by[name], "captions_changed": edited[name]}
        seen.add(name)
        ops.append({"stage": juicer.STAGE, "name": name, "threshold": args, **counts})
    kept = sum(entry["status"] == "kept" for entry in samples)
    return {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "input_folder": str(scan.folder),
        "captions_from": scan.captions_from,
        "recipe": str(recipe.path),
        "trigger_word": trigger_word,
        "counts": {"input": len(samples), "kept": kept, "dropped": len(samples) - kept},
        "dropped_by": {op["name"]: op["dropped"] for op in ops if op["dropped"]},
        "ops": ops,
        "samples": samples,
        "ignored_files": scan.ignored,
    }


def _entry(
    check: Check,
    run: JuicerRun | None,
    params: dict[str, Any],
    kept_rows: dict[str, dict[str, Any]],
    placed: dict[str, str],
    final_captions: dict[str, str],
) -> dict[str, Any]:
    sample = check.sample
    entry: dict[str, Any] = {"id": sample.id, "source": str(sample.path)}
    caption: dict[str, Any] = {"original": sample.caption}
    if check.reason is not None:
        entry.update(
            status="dropped",
            stage=validate.STAGE,
            op=check.reason,
            reason=check.detail,
            measured=check.measured,
            threshold=check.threshold,
        )
        if check.duplicate_of:
            entry["duplicate_of"] = check.duplicate_of
        return _with_caption(entry, caption, check)
    entry["file"] = check.measured
    edits = run.caption_edits.get(sample.id, []) if run else []
    drop = run.drops.get(sample.id) if run else None
    if drop is not None:
        entry.update(
            status="dropped", stage=juicer.STAGE, op=drop.op, measured=drop.measured, threshold=params.get(drop.op, {})
        )
        if drop.duplicate_of is not None:
            entry["duplicate_of"] = drop.duplicate_of
        caption.update(at_drop=drop.caption, changed_by=edits)
    else:
        entry.update(status="kept", output=placed[sample.id])
        caption.update(final=final_captions[sample.id], changed_by=edits)
        entry["measured"] = _measurements(kept_rows[sample.id])
    return _with_caption(entry, caption, check)


def _with_caption(entry: dict[str, Any], caption: dict[str, Any], check: Check) -> dict[str, Any]:
    entry["caption"] = caption
    if check.caption_cleaned:
        entry[CAPTION_CLEANING] = check.caption_cleaned
    return entry


def _measurements(row: dict[str, Any]) -> dict[str, Any]:
    """Everything Data-Juicer measured for a kept sample: its stats and hashes."""
    from data_juicer.utils.constant import Fields

    return {**(row.get(Fields.stats) or {}), **juicer.hash_columns(row)}


def write_reports(report: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """Write report.json and its human-readable twin report.md into ``folder``."""
    return write_json(folder / "report.json", report), write_text(folder / "report.md", render_markdown(report))


def render_markdown(report: dict[str, Any]) -> str:
    """Counts, a per-op summary, then one table row per dropped and per kept sample."""
    counts = report["counts"]
    lines = [
        "# Data prep report",
        "",
        f"- source: `{report['source']}` (captions from {report['captions_from']})",
        f"- recipe: `{report['recipe']}`",
        f"- trigger word: {report['trigger_word'] or '(none)'}",
        f"- **{counts['input']} samples in, {counts['kept']} kept, {counts['dropped']} dropped**",
        "",
        "## Per op",
        "",
        "| stage | op | threshold | dropped | captions changed |",
        "|---|---|---|---:|---:|",
    ]
    for op in report["ops"]:
        threshold = _short(op.get("threshold")) or op.get("rule", "")
        lines.append(
            f"| {op['stage']} | `{op['name']}` | {threshold} | {op['dropped']} | {op.get('captions_changed', '')} |"
        )
    dropped = [entry for entry in report["samples"] if entry["status"] == "dropped"]
    lines += [
        "",
        f"## Dropped ({len(dropped)})",
        "",
        "| sample | op | measured | threshold | duplicate of |",
        "|---|---|---|---|---|",
    ]
    for entry in dropped:
        measured = _short(entry["measured"]) or entry.get("reason", "")
        original = entry.get("duplicate_of") or ""
        lines.append(f"| `{entry['id']}` | `{entry['op']}` | {measured} | {_short(entry['threshold'])} | {original} |")
    kept = [entry for entry in report["samples"] if entry["status"] == "kept"]
    lines += ["", f"## Kept ({len(kept)})", "", "| sample | file | caption |", "|---|---|---|"]
    for entry in kept:
        lines.append(f"| `{entry['id']}` | `{entry['output']}` | {_cell(entry['caption']['final'])} |")
    cleaned = [entry for entry in report["samples"] if entry.get(CAPTION_CLEANING)]
    if cleaned:
        lines += ["", f"## Captions cleaned ({len(cleaned)})", "", "| sample | removed or changed |", "|---|---|"]
        lines += [f"| `{entry['id']}` | {_cell(', '.join(entry[CAPTION_CLEANING]))} |" for entry in cleaned]
    if report["ignored_files"]:
        lines += ["", "## Files that are not samples", ""] + [f"- `{name}`" for name in report["ignored_files"]]
    return "\n".join(lines) + "\n"


def _short(values: Any) -> str:
    if not values:
        return ""
    return _cell(", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in values.items()))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
