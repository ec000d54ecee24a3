"""Run the recipe on Data-Juicer's RayExecutor and explain every drop, as the default executor's run does.

Data-Juicer 1.6's Ray mode differs from its default executor in ways the
report cannot afford, and this module closes each gap:

- ``image_deduplicator`` has no Ray implementation; it runs as
  ``ray_image_deduplicator`` (see :mod:`kstory.prep.ray_dedup`, fed the
  pre-check's hash so both executors compare the same hashes).
- That deduplicator keeps whichever copy reaches its shared set first, which
  depends on scheduling.  kstory keeps the earliest copy in input order, as
  the default executor does, so the kept set never depends on timing.
- Its tracer records no duplicate pairs and stops after ``trace_num``
  samples per op.  The original of every duplicate is found from the hashes;
  a drop or caption change the tracer did not record is found by replaying
  the sample through the same ops in this process (cheap: the picture
  measurements are already in the row).
- It reads JSON only: the input is the same ``input.jsonl`` either way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.ray_cluster import RAY_MODE_VARIABLE, ray_cluster
from kstory.prep.juicer import Drop, JuicerRun, hash_columns
from kstory.prep.recipe import IMAGE_KEY, TEXT_KEY, Recipe, parse_config, pinned_config

log = logging.getLogger(__name__)

SETTING = "prep.ray_address (--ray-address)"
RAY_OPS = {"image_deduplicator": "kstory_ray_image_deduplicator"}  # default-executor op -> its Ray twin
DEDUP_ONLY_ARGS = {"consider_text"}  # image_deduplicator arguments the Ray op does not have


def ray_ops(recipe: Recipe) -> list[tuple[str, str, dict[str, Any]]]:
    """(recipe name, name run under Ray, arguments) per op; refuses a recipe Ray mode cannot run as written."""
    from data_juicer.ops import OPERATORS
    from data_juicer.ops.base_op import Deduplicator

    import kstory.prep.ray_dedup  # noqa: F401  (registers the Ray twin)

    mapped = []
    for name, args in recipe.ops:
        ray_name = RAY_OPS.get(name, name)
        if name in RAY_OPS and set(args) & DEDUP_ONLY_ARGS:
            raise KstoryError(
                f"`{name}` with {sorted(set(args) & DEDUP_ONLY_ARGS)} has no Ray version",
                path=recipe.path,
                fix="drop that argument or set prep.executor to `default`",
            )
        op_class = OPERATORS.modules[ray_name]
        if "ray" not in op_class._supported_exec_modes:
            raise KstoryError(
                f"op `{name}` cannot run on Data-Juicer's Ray executor",
                path=recipe.path,
                fix="remove it from the recipe or set prep.executor to `default`",
            )
        mapped.append((name, ray_name, args))
    dedups = [i for i, (name, ray_name, _) in enumerate(mapped) if _is_dedup(name, ray_name, Deduplicator)]
    if dedups and dedups[0] != len(mapped) - 1:
        raise KstoryError(
            "under Ray the deduplicator must be the last op (it keeps the earliest copy only once every "
            "sample has reached it, and an op after it would have judged another copy)",
            path=recipe.path,
            fix="move the deduplicator to the end of `process:` or set prep.executor to `default`",
        )
    return mapped


def _is_dedup(name: str, ray_name: str, base: type) -> bool:
    from data_juicer.ops import OPERATORS
    from data_juicer.ops.deduplicator.ray_basic_deduplicator import RayBasicDeduplicator

    op_class = OPERATORS.modules[ray_name]
    return issubclass(op_class, (base, RayBasicDeduplicator)) or issubclass(OPERATORS.modules[name], base)


def run_juicer_on_ray(
    recipe: Recipe,
    rows: Sequence[dict[str, Any]],
    *,
    work_dir: Path,
    address: str,
    trace_num: int | None = None,
) -> JuicerRun:
    """Process ``rows`` with the recipe on Ray at ``address``; the same JuicerRun the default executor gives.

    ``trace_num`` overrides the tracer's cap (default: every sample), to
    exercise the replay that covers what a capped tracer left out.
    """
    from loguru import logger as loguru_logger

    mapped = ray_ops(recipe)
    config = pinned_config(recipe, work_dir=work_dir, num_samples=len(rows))
    config.pop("np", None)
    config.update(
        executor_type="ray",
        ray_address="auto",  # kstory connects first (ray_cluster); Data-Juicer's init then reuses that connection
        process=[{ray_name: dict(args)} for _, ray_name, args in mapped],
        trace_num=trace_num or config["trace_num"],
    )
    with open(config["dataset_path"], "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    sink = loguru_logger.add(work_dir / "data_juicer.log", level="INFO", enqueue=False)
    try:
        with ray_cluster(address, setting=SETTING) as cluster, _ray_mode():
            log.info("data-juicer on Ray (%s)", cluster)
            cfg = parse_config(config, work_dir)  # sets Data-Juicer's Ray-mode variable, which _ray_mode restores
            kept = _run(cfg)
    finally:
        loguru_logger.remove(sink)
    return explain(recipe, mapped, rows, kept, Path(cfg.work_dir) / "trace", trace_num=cfg.trace_num)


@contextlib.contextmanager
def _ray_mode() -> Iterator[None]:
    """Data-Juicer's tracer asks this variable, in the driver too, whether it is a Ray actor."""
    previous = os.environ.get(RAY_MODE_VARIABLE)
    os.environ[RAY_MODE_VARIABLE] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RAY_MODE_VARIABLE, None)
        else:
            os.environ[RAY_MODE_VARIABLE] = previous


def _run(cfg: Any) -> list[dict[str, Any]]:
    from data_juicer.core.executor.ray_executor import RayExecutor

    executor = RayExecutor(cfg)
    result = executor.run(skip_export=True)
    return [plain(row) for row in result.data.take_all()]


def explain(
    recipe: Recipe,
    mapped: list[tuple[str, str, dict[str, Any]]],
    rows: Sequence[dict[str, Any]],
    ray_kept: list[dict[str, Any]],
    trace_dir: Path,
    *,
    trace_num: int,
) -> JuicerRun:
    """The kept rows in input order (earliest copy of each duplicate group) and a Drop for every other row."""
    from data_juicer.ops import OPERATORS
    from data_juicer.ops.base_op import Filter, Mapper

    order = {row["id"]: index for index, row in enumerate(rows)}
    by_id = {row["id"]: row for row in rows}
    kept = {row["id"]: row for row in ray_kept}
    drops: dict[str, Drop] = {}
    at_dedup: dict[str, dict[str, Any]] = {}  # dropped as duplicates: the row as the deduplicator saw it
    caption_edits: dict[str, list[str]] = {}
    edits_complete = True
    for name, ray_name, _ in mapped:
        records = _jsonl(trace_dir / f"sample_trace-{ray_name}.jsonl")
        op_class = OPERATORS.modules[ray_name]
        if issubclass(op_class, Mapper):
            edits_complete &= len(records) < trace_num
            for record in records:
                caption_edits.setdefault(record["id"], []).append(name)
        elif name in RAY_OPS:
            for record in records:
                at_dedup[record["id"]] = record
        elif issubclass(op_class, Filter):
            for record in records:
                drops.setdefault(record["id"], Drop(name, plain(record.get("__dj__stats__") or {}), record[TEXT_KEY]))
    untraced = [row for row in rows if row["id"] not in kept and row["id"] not in drops and row["id"] not in at_dedup]
    replayer = _Replayer(recipe, mapped) if untraced or not edits_complete else None
    for row in untraced:
        edits, drop, seen = replayer.run(row)
        if drop is None:
            at_dedup[row["id"]] = seen
        else:
            drops[row["id"]] = drop
    if not edits_complete:  # a mapper's trace hit the cap: take every row's edits from the replay
        caption_edits = {row["id"]: edits for row in rows if (edits := replayer.run(row)[0])}
    kept_rows, dedup_drops = _earliest_copies(mapped, kept, at_dedup, order, by_id)
    drops.update(dedup_drops)
    if len(kept_rows) + len(drops) != len(rows):
        raise KstoryError(
            f"the Ray run accounted for {len(kept_rows) + len(drops)} of {len(rows)} samples",
            fix="set prep.executor to `default` and report this",
        )
    return JuicerRun(kept=kept_rows, drops=drops, caption_edits=caption_edits)


def _earliest_copies(
    mapped: list[tuple[str, str, dict[str, Any]]],
    kept: dict[str, dict[str, Any]],
    at_dedup: dict[str, dict[str, Any]],
    order: dict[str, int],
    by_id: dict[str, dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, Drop]]:
    """Keep the first copy in input order of every hash group that reached the deduplicator."""
    dedup_name = next((name for name, _, _ in mapped if name in RAY_OPS), None)
    if dedup_name is None:
        return sorted(kept.values(), key=lambda row: order[row["id"]]), {}
    reached = {**at_dedup, **kept}
    groups: dict[str, list[str]] = {}
    for sample_id in sorted(reached, key=order.__getitem__):
        signature = json.dumps(hash_columns(by_id[sample_id]), sort_keys=True)
        groups.setdefault(signature, []).append(sample_id)
    kept_rows, drops = [], {}
    swapped = 0
    for members in groups.values():
        first = members[0]
        swapped += first not in kept
        kept_rows.append(_kept_row(reached[first], by_id[first]))
        for other in members[1:]:
            seen = reached[other]
            drops[other] = Drop(dedup_name, hash_columns(by_id[other]), seen.get(TEXT_KEY), duplicate_of=first)
    if swapped:
        log.info("ray deduplicator kept a later copy in %d group(s); kept the earliest in input order instead", swapped)
    return sorted(kept_rows, key=lambda row: order[row["id"]]), drops


def _kept_row(seen: dict[str, Any], original: dict[str, Any]) -> dict[str, Any]:
    """The row as the default executor would return it: no Ray dedup flag, the input's hashes."""
    from data_juicer.utils.constant import HashKeys

    row = {key: value for key, value in seen.items() if key != HashKeys.is_unique}
    row.update(hash_columns(original))
    return row


class _Replayer:
    """Runs one row through the recipe's mappers and filters in this process, to explain what no trace recorded."""

    def __init__(self, recipe: Recipe, mapped: list[tuple[str, str, dict[str, Any]]]) -> None:
        from data_juicer.ops import load_ops

        entries = [
            {name: {**args, "text_key": TEXT_KEY, "image_key": IMAGE_KEY}}
            for name, _, args in mapped
            if name not in RAY_OPS
        ]
        self.ops = list(zip([next(iter(entry)) for entry in entries], load_ops(entries)))

    def run(self, row: dict[str, Any]) -> tuple[list[str], Drop | None, dict[str, Any]]:
        """(mappers that changed the caption, the filter's Drop or None, the row as the deduplicator would see it)."""
        from data_juicer.ops.base_op import Filter, Mapper

        sample = json.loads(json.dumps(row))
        edits: list[str] = []
        for name, op in self.ops:
            if isinstance(op, Mapper):
                before = sample[TEXT_KEY]
                sample = _one(op, sample, op.process_batched if op.is_batched_op() else op.process_single)
                if sample[TEXT_KEY] != before:
                    edits.append(name)
            elif isinstance(op, Filter):
                sample = _one(op, sample, op.compute_stats_batched if op.is_batched_op() else op.compute_stats_single)
                keep = op.process_batched(_batch(sample)) if op.is_batched_op() else op.process_single(sample)
                keep = next(iter(keep)) if op.is_batched_op() else keep
                if not keep:
                    return edits, Drop(name, _as_traced(sample.get("__dj__stats__") or {}), sample[TEXT_KEY]), sample
        return edits, None, sample


def _as_traced(stats: dict[str, Any]) -> dict[str, Any]:
    """Stats written and read back the way Data-Juicer's tracers write them (pandas JSON, 10 decimals)."""
    import pandas as pd

    return json.loads(pd.DataFrame([{"stats": plain(stats)}]).to_json(orient="records", lines=True))["stats"]


def _batch(sample: dict[str, Any]) -> dict[str, list[Any]]:
    return {key: [value] for key, value in sample.items()}


def _one(op: Any, sample: dict[str, Any], method: Any) -> dict[str, Any]:
    if not op.is_batched_op():
        return method(sample)
    result = method(_batch(sample))
    return {key: values[0] for key, values in result.items()}


def plain(value: Any) -> Any:
    """Ray hands rows back as numpy values; the report and the comparison need plain JSON types."""
    import numpy as np

    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return [plain(item) for item in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
