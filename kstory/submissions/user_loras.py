"""The user's own LoRAs in a package: shipped only when their licence allows, otherwise recorded by hash and source.

A LoRA someone else made is theirs to license. ``story.loras[].ship: true``
says its licence lets the user redistribute it: the package then holds it
under ``loras/`` and verifies from the package alone. Otherwise the package
names it (file name, sha256, source, scale) and ``kstory verify --lora PATH``
supplies it, found by its sha256.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kstory.core.atomic import copy_file
from kstory.core.lora_stack import LoraRequest, requests_from_records

FOLDER = "loras"


def ship_user_loras(manifest: dict[str, Any], staging: Path) -> list[dict[str, Any]]:
    """Copy the shippable LoRAs into ``staging/loras/``; returns each LoRA's package record, in merge order.

    The package's manifest gets each LoRA's file name in place of the packaging machine's path.
    """
    entries = []
    for number, record in enumerate(manifest.get("loras") or [], start=1):
        entry = {key: record.get(key) for key in ("file", "sha256", "format", "scale", "source")}
        entry["shipped"] = bool(record.get("ship"))
        entry["package_file"] = None
        if entry["shipped"]:
            found = requests_from_records([record], where=Path(record["path"]))[0].path
            rel = f"{FOLDER}/{number:02d}-{record['file']}"
            copy_file(found, staging / rel)
            entry["package_file"] = rel
        record["path"] = record["file"]
        entries.append(entry)
    return entries


def model_card_section(entries: Sequence[dict[str, Any]]) -> str:
    """The model card's account of the other LoRAs the frames were made with (empty without any)."""
    if not entries:
        return ""
    rows = "\n".join(
        f"| {e['file']} | {e['source'] or '(not given)'} | {e['scale']:g} | `{e['sha256']}` | "
        f"{'`' + e['package_file'] + '`' if e['shipped'] else 'not included (licence not marked as allowing it)'} |"
        for e in entries)
    return f"""
## Other LoRAs in the frames

The frames were made with these LoRAs stacked on this one, in this order. They belong to their authors; the ones
not included here are named by their sha256 so you can find the same files.

| file | source | scale | sha256 | in this package |
|---|---|---|---|---|
{rows}
"""


def verify_requests(submission: Path, manifest: dict[str, Any], supplied: Sequence[Path] = ()) -> list[LoraRequest]:
    """The manifest's LoRAs for a regeneration: the package's own copies first, then the files given (by sha256)."""
    shipped = sorted((submission / FOLDER).glob("*")) if (submission / FOLDER).is_dir() else []
    return requests_from_records(manifest.get("loras") or [], [*shipped, *map(Path, supplied)], where=submission)
