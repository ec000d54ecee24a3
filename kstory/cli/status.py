"""``kstory status RUN``: who writes into a run, its jobs, and the state of each stage, as a short table."""

from __future__ import annotations

from pathlib import Path

from kstory.cli import jobs
from kstory.core.runlock import describe, holder_alive, read_lock
from kstory.core.rundir import RunDir, read_stamp

RECENT_JOBS = 5


def stage_states(run_root: Path) -> list[tuple[str, str, Path]]:
    """(stage, state, output) for each stage: up to date, out of date, finished, unfinished, missing, not configured.

    "up to date" and "out of date" compare the stamp with the run's kstory.yaml
    the way ``kstory run`` does; without a config a stamped output is "finished".
    """
    from kstory.cli.stages import STAGES, stage_fingerprints

    run = RunDir(Path(run_root))
    config = None
    if run.config.is_file():
        try:
            from kstory.core.config import load_config

            config = load_config(run.config)
        except Exception:  # noqa: BLE001 - a broken config only means nothing to compare against
            config = None
    rows = []
    try:
        walked = list(stage_fingerprints(config, run)) if config is not None else []
    except Exception:  # noqa: BLE001 - inputs that cannot be read: nothing to compare against
        walked = []
    found = {stage.name: (digest, schedule) for stage, digest, schedule in walked}
    for stage in STAGES:
        output = stage.output(run)
        digest, schedule = found.get(stage.name, (None, {}))
        stamp = read_stamp(output)
        if config is not None and not stage.enabled(config):
            state = "not configured"
        elif not output.exists():
            state = "missing"
        elif stamp is None or stamp.get("finished") is False:
            state = "unfinished"
        elif digest is None:
            state = "finished"
        elif stamp.get("fingerprint") != digest:
            state = "out of date"
        elif schedule and stamp.get("schedule", schedule["schedule"]) != schedule["schedule"]:
            state = "new schedule"  # `kstory run` continues (or stops) it, see docs/train.md
        else:
            state = "up to date"
        rows.append((stage.name, state, output))
    return rows


def render_status(run_root: Path) -> str:
    """The status table of the run at ``run_root``."""
    run_root = Path(run_root)
    lines = [f"run {run_root}"]
    lock = read_lock(run_root)
    if lock is None:
        lines.append("writer: none")
    elif holder_alive(lock):
        lines.append(f"writer: {describe(lock)}")
    else:
        lines.append(f"writer: none (stale lock of {describe(lock)}; the next command recovers it)")
    records = jobs.list_jobs(run_root)
    shown = [job for job in records if job.get("state") not in jobs.FINAL]
    shown += [job for job in records if job.get("state") in jobs.FINAL][:RECENT_JOBS]
    lines.append("jobs:" if shown else "jobs: none")
    for job in shown:
        progress = job.get("progress") or {}
        percent = f"{100 * float(progress.get('fraction') or 0):3.0f}%"
        detail = str(job.get("error") or "") if job.get("state") == "failed" else str(progress.get("text") or "")
        detail = detail.splitlines()[0] if detail else ""
        lines.append(f"  {job['id']}  {job.get('state', '?'):<9} {percent}  {job.get('label', '')}: {detail}")
    lines.append("stages:")
    for name, state, output in stage_states(run_root):
        shown_path = output.relative_to(run_root) if output.is_relative_to(run_root) else output
        lines.append(f"  {name:<6} {state:<14} {shown_path}")
    return "\n".join(lines)
