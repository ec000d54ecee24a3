"""`kstory prep`: source -> pre-checks -> Data-Juicer recipe -> DiffSynth training folder + report."""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kstory.prep import layout
from kstory.prep.executors import DEFAULT_EXECUTOR, RAY, choose_executor
from kstory.prep.juicer import JuicerRun, run_juicer
from kstory.prep.ray_executor import run_juicer_on_ray
from kstory.prep.recipe import IMAGE_KEY, TEXT_KEY, Recipe, juicer_config, load_recipe, no_auto_install
from kstory.prep.report import build_report, write_reports
from kstory.prep.sources import export_modelscope, is_modelscope_id, scan_folder
from kstory.prep.validate import Check, checking_samples, measuring_ops
from kstory.core.atomic import write_json
from kstory.core.errors import KstoryError
from kstory.core.logs import route_loguru

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepResult:
    """Where the outputs are and how many samples survived which step."""

    out: Path
    kept: int
    dropped: int
    metadata_csv: Path
    report_json: Path
    report_md: Path
    dropped_by: dict[str, int]


def prep(
    source: str | Path,
    out: Path,
    *,
    recipe: Path | None = None,
    trigger_word: str | None = None,
    overwrite: bool = False,
    num_proc: int = 1,
    show_progress: bool = True,
    executor: str = "default",
    ray_address: str = "local",
) -> PrepResult:
    """Clean an image-caption dataset into ``out/train`` (DiffSynth layout); explain every drop in ``out/report.json``.

    ``source`` is a local folder or ``modelscope://owner/name[?subset=..&split=..]``.
    The input is never modified; ``out`` is replaced as a whole or not at all.
    ``executor`` ``ray`` runs the recipe on Data-Juicer's RayExecutor at
    ``ray_address`` (``local``, ``auto`` or HOST:PORT) with the same outputs.
    Raises KstoryError when nothing is left (after writing the report).
    """
    out = Path(out).absolute()
    trigger_word = (trigger_word or "").strip() or None
    if num_proc < 1:
        raise KstoryError(f"num_proc must be >= 1, got {num_proc}", fix="pass a positive number of processes")
    executor = choose_executor(executor)
    inputs = inputs_fingerprint(source, recipe, trigger_word)
    if not overwrite and (done := finished_result(out, inputs)) is not None:
        log.info("prep: %s already holds this prep of the same inputs, recipe and trigger word: nothing to do", out)
        return done
    layout.check_out(out, overwrite=overwrite)
    folder = None if is_modelscope_id(source) else _local_folder(source, out)
    loaded = load_recipe(recipe)  # imports Data-Juicer, which re-adds its loguru stderr sink
    route_loguru()
    staging = layout.make_staging(out)
    try:
        handler = _log_to(staging / "prep.log")
        try:
            with no_auto_install():
                result = _build(str(source), folder, out, staging, loaded, trigger_word, num_proc, show_progress,
                                (executor, ray_address))
        finally:
            logging.getLogger("kstory.prep").removeHandler(handler)
            handler.close()
        write_json(staging / INPUTS_FILE, {"fingerprint": inputs})
        layout.publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if result.kept == 0:
        steps = ", ".join(f"{op} dropped {count}" for op, count in result.dropped_by.items())
        top = max(result.dropped_by, key=result.dropped_by.get)
        raise KstoryError(
            f"no samples left after filtering all {result.dropped}: {steps}",
            path=result.report_json,
            fix=f"see the report; loosen `{top}` in a copy of the recipe (pass it with --recipe) or fix the input",
        )
    return result


INPUTS_FILE = ".kstory-prep-inputs.json"  # what a finished prep was made from, so running it again is a no-op


def inputs_fingerprint(source: str | Path, recipe: Path | None, trigger_word: str | None) -> str:
    """The content of what prep reads: the source folder's files (or a hub dataset's name), the recipe, the trigger."""
    from kstory.core.hashing import path_digest
    from kstory.core.rundir import fingerprint
    from kstory.prep.recipe import DEFAULT_RECIPE

    source_state = str(source) if is_modelscope_id(source) else path_digest(Path(source))
    return fingerprint("prep-inputs/1", source_state, path_digest(Path(recipe or DEFAULT_RECIPE)), trigger_word or "")


def finished_result(out: Path, inputs: str) -> PrepResult | None:
    """The result of a finished prep in ``out`` made from exactly ``inputs``, or None."""
    import json

    try:
        recorded = json.loads((out / INPUTS_FILE).read_text(encoding="utf-8"))["fingerprint"]
        report = json.loads((out / layout.REPORT_NAME).read_text(encoding="utf-8"))
        counts = report["counts"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if recorded != inputs or not (out / "train" / "metadata.csv").is_file():
        return None
    return PrepResult(out, counts["kept"], counts["dropped"], out / "train" / "metadata.csv", out / layout.REPORT_NAME,
                      out / "report.md", dict(report.get("dropped_by") or {}))


def _build(
    source: str,
    folder: Path | None,
    out: Path,
    staging: Path,
    recipe: Recipe,
    trigger_word: str | None,
    num_proc: int,
    show_progress: bool,
    engine: tuple[str, str] = (DEFAULT_EXECUTOR, "local"),
) -> PrepResult:
    """Everything up to the publish, written into ``staging``; returns the result with final paths.

    ``folder`` is the local input, or None to export the ModelScope ``source`` into the work dir first.
    """
    started = time.perf_counter()
    work_dir = staging / "juicer"
    work_dir.mkdir()
    folder = folder or export_modelscope(source, work_dir / "source")
    scan = scan_folder(folder)
    if not scan.samples:
        raise KstoryError(
            "no pictures found", path=folder, fix="point at a folder with images and metadata.csv / .txt captions"
        )
    log.info(
        "%d samples in %s (captions from %s), recipe %s", len(scan.samples), folder, scan.captions_from, recipe.path
    )

    with checking_samples(
        scan.samples, measuring_ops(recipe), max_pixels=recipe.max_image_pixels, num_proc=num_proc, show_progress=show_progress
    ) as checked:
        # parsing the config takes a second or two: let it overlap the workers' decoding
        cfg = juicer_config(recipe, work_dir=work_dir, num_samples=len(scan.samples)) if engine[0] != RAY else None
        checks = checked()
    failed = Counter(check.reason for check in checks if check.reason)
    log.info(
        "pre-checks: %d passed, dropped %s (%.1fs)",
        len(checks) - sum(failed.values()),
        dict(failed),
        time.perf_counter() - started,
    )

    passed = [check for check in checks if check.reason is None]
    with layout.TrainingSetWriter([_picture(check) for check in passed], staging) as training_set:
        rows = [_row(check) for check in passed]
        if not passed:
            run = None
        elif engine[0] == RAY:
            run = run_juicer_on_ray(recipe, rows, work_dir=work_dir, address=engine[1])
        else:
            run = run_juicer(cfg, recipe, rows, work_dir / "data_juicer.log")
        if run is not None:
            log.info(
                "data-juicer: %d of %d kept, dropped %s (%.1fs)",
                len(run.kept),
                len(passed),
                dict(Counter(d.op for d in run.drops.values())),
                time.perf_counter() - started,
            )
        captions = _final_captions(run, trigger_word)
        placed = training_set.finish(list(captions.items()), show_progress=show_progress) if captions else {}
    report = build_report(
        source=source,
        scan=scan,
        recipe=recipe,
        trigger_word=trigger_word,
        checks=checks,
        run=run,
        placed=placed,
        final_captions=captions,
    )
    write_reports(report, staging)
    log.info(
        "%d kept, %d dropped in %.1fs",
        report["counts"]["kept"],
        report["counts"]["dropped"],
        time.perf_counter() - started,
    )
    return PrepResult(
        out=out,
        kept=report["counts"]["kept"],
        dropped=report["counts"]["dropped"],
        metadata_csv=out / layout.TRAIN_DIR / "metadata.csv",
        report_json=out / "report.json",
        report_md=out / "report.md",
        dropped_by=report["dropped_by"],
    )


def _local_folder(source: str | Path, out: Path) -> Path:
    folder = Path(source).absolute()
    if folder == out or folder in out.parents or out in folder.parents:
        raise KstoryError(
            "the output folder must not be inside the input folder or contain it",
            path=out,
            fix="choose an output folder outside the dataset",
        )
    return folder


def _row(check: Check) -> dict:
    """The Data-Juicer input row: caption, picture path, and the measurements already taken."""
    from data_juicer.utils.constant import Fields

    sample = check.sample
    return {
        "id": sample.id,
        TEXT_KEY: check.caption,
        IMAGE_KEY: [str(sample.path)],
        Fields.stats: check.stats,
        **check.hashes,
    }


def _picture(check: Check) -> layout.Picture:
    reencode = layout.needs_reencode(
        check.measured["format"], check.measured.get("exif_orientation", 1), check.measured.get("scaled_from")
    )
    return layout.Picture(check.sample.id, check.sample.path, reencode)


def _final_captions(run: JuicerRun | None, trigger_word: str | None) -> dict[str, str]:
    """Sample id -> training caption (cleaned by the recipe, trigger added), in Data-Juicer's output order."""
    if run is None:
        return {}
    return {row["id"]: layout.with_trigger(row[TEXT_KEY], trigger_word) for row in run.kept}


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("kstory.prep")
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    return handler
