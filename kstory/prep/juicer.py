"""Run the recipe with Data-Juicer's DefaultExecutor and read back, from its tracer, why each sample left."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kstory.prep.recipe import TEXT_KEY, Recipe

STAGE = "data-juicer"


@dataclass
class Drop:
    """Which op removed a sample, what it had measured, and (for deduplicators) the sample it duplicates."""

    op: str
    measured: dict[str, Any]
    caption: str | None  # as the op saw it (after the caption mappers); None when not traced
    duplicate_of: str | None = None


@dataclass
class JuicerRun:
    """What came out of Data-Juicer: the kept rows (cleaned captions, stats) and every drop."""

    kept: list[dict[str, Any]]
    drops: dict[str, Drop]
    caption_edits: dict[str, list[str]] = field(default_factory=dict)


def run_juicer(cfg: Any, recipe: Recipe, rows: Sequence[dict[str, Any]], log_file: Path) -> JuicerRun:
    """Process ``rows`` (id, text, images, pre-measured stats/hashes) with the configured ops."""
    import datasets
    from data_juicer.core.data import NestedDataset
    from data_juicer.core.executor.default_executor import DefaultExecutor
    from loguru import logger as loguru_logger

    with open(cfg.dataset_path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sink = loguru_logger.add(log_file, level="INFO", enqueue=False)
    try:
        executor = DefaultExecutor(cfg)
        _trace_in_process(executor, cfg)
        result = executor.run(dataset=NestedDataset(datasets.Dataset.from_list(list(rows))), skip_export=True)
    finally:
        loguru_logger.remove(sink)
    kept = result.to_list()
    trace_dir = Path(executor.work_dir) / "trace"
    drops, caption_edits = _read_traces(trace_dir, recipe)
    _attribute_untraced(rows, kept, drops, recipe)
    return JuicerRun(kept=kept, drops=drops, caption_edits=caption_edits)


def _trace_in_process(executor: Any, cfg: Any) -> None:
    """Give the executor's tracer a thread lock when every op runs in this process.

    Data-Juicer's tracer guards its per-op counters with a ``Manager().Lock()``
    (a lock served by another process) and asks it once per sample and op
    whether enough samples were traced; with room for every sample that
    question never ends early, and its two round trips to the lock's process
    were ~40% of the executor's time.  With ``np: 1`` (ops at ``num_proc`` 0,
    see recipe.py) no other process shares the tracer, so a thread lock guards
    the same counters and the traces are the same.
    """
    from data_juicer.core.tracer import Tracer

    in_process = all(args.get("num_proc") == 0 for entry in cfg.process for args in entry.values())
    tracer = getattr(executor, "tracer", None)
    if not (in_process and isinstance(tracer, Tracer)):
        return
    executor.tracer = Tracer(
        executor.work_dir,
        cfg.op_list_to_trace,
        show_num=cfg.trace_num,
        trace_keys=cfg.trace_keys,
        lock=threading.Lock(),
    )


def _read_traces(trace_dir: Path, recipe: Recipe) -> tuple[dict[str, Drop], dict[str, list[str]]]:
    """Filter traces hold each dropped sample with its stats, deduplicator traces (kept, dropped)
    pairs, mapper traces the captions each mapper changed."""
    from data_juicer.ops import OPERATORS
    from data_juicer.ops.base_op import Deduplicator, Filter
    from data_juicer.utils.constant import Fields

    drops: dict[str, Drop] = {}
    caption_edits: dict[str, list[str]] = {}
    for name in dict(recipe.ops):
        op_class = OPERATORS.modules[name]
        if issubclass(op_class, Deduplicator):
            for pair in _jsonl(trace_dir / f"duplicate-{name}.jsonl"):
                kept, dropped = pair["dup1"], pair["dup2"]
                drops[dropped["id"]] = Drop(name, hash_columns(dropped), dropped[TEXT_KEY], duplicate_of=kept["id"])
            continue
        for record in _jsonl(trace_dir / f"sample_trace-{name}.jsonl"):
            if issubclass(op_class, Filter):
                drops.setdefault(record["id"], Drop(name, record.get(Fields.stats) or {}, record[TEXT_KEY]))
            else:
                caption_edits.setdefault(record["id"], []).append(name)
    return drops, caption_edits


def _attribute_untraced(
    rows: Sequence[dict[str, Any]], kept: list[dict[str, Any]], drops: dict[str, Drop], recipe: Recipe
) -> None:
    """Name the op and the original for duplicates the tracer did not pair.

    A deduplicator traces only the first two members of each group of equal
    hashes; the third and later copies are matched here on the same hashes
    (taken before Data-Juicer ran, see validate.py), against the earliest
    sample of the group that reached the deduplicator.
    """
    from data_juicer.ops import OPERATORS
    from data_juicer.ops.base_op import Deduplicator

    kept_ids = {row["id"] for row in kept}
    untraced = [row for row in rows if row["id"] not in kept_ids and row["id"] not in drops]
    if not untraced:
        return
    position = {name: index for index, (name, _) in enumerate(recipe.ops)}
    dedups = [name for name in position if issubclass(OPERATORS.modules[name], Deduplicator)]
    op = " or ".join(dedups) or "unknown (not traced)"
    first_dedup = min((position[name] for name in dedups), default=len(position))

    def reached_dedup(row: dict[str, Any]) -> bool:
        drop = drops.get(row["id"])
        return drop is None or position.get(drop.op, len(position)) >= first_dedup

    candidates = [row for row in rows if reached_dedup(row)]
    for row in untraced:
        signature = hash_columns(row)
        original = next((other["id"] for other in candidates if signature and hash_columns(other) == signature), None)
        drops[row["id"]] = Drop(op, signature, None, duplicate_of=original if original != row["id"] else None)


def hash_columns(row: dict[str, Any]) -> dict[str, Any]:
    """The Data-Juicer hash columns of a row (e.g. ``__dj__imagehash``)."""
    from data_juicer.utils.constant import HashKeys

    names = {value for name, value in vars(HashKeys).items() if not name.startswith("_")}
    return {key: value for key, value in row.items() if key in names}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
