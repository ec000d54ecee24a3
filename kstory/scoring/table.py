"""The terminal view of a report: one row per frame, then the gate in words."""

from __future__ import annotations

from pathlib import Path

from kstory.scoring.report import ScoreReport

SCALE_TOP = 10.0  # the predictor was trained on 1-10 ratings: a frame needing more cannot fix the mean alone


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_table(report: ScoreReport) -> str:
    """Per-frame aesthetic, CLIP-T and CLIP-I, marking the weakest frames and the odd one out."""
    summary = report.summary
    weakest = {frame.file for frame in summary.weakest if frame.below_threshold_by > 0}
    name_width = max([len(Path(i.file).name) for i in report.images] + [4])
    lines = [f"{'file':<{name_width}}  aesthetic  CLIP-T  CLIP-I  note"]
    for image in report.images:
        notes = []
        if image.file in weakest:
            notes.append(f"{image.aesthetic - summary.threshold:+.3f} vs gate")
        if image.file == summary.odd_one_out:
            notes.append("odd one out")
        lines.append(f"{Path(image.file).name:<{name_width}}  {image.aesthetic:9.4f}  {_num(image.clip_t):>6}  "
                     f"{_num(image.clip_i_to_others):>6}  {', '.join(notes)}".rstrip())
    for item in report.skipped:
        lines.append(f"{Path(item.file).name:<{name_width}}  skipped: {item.reason}")
    lines.append("")
    if summary.mean is None:
        lines.append("no image could be scored")
    else:
        lines.append(f"mean {summary.mean:.4f}  min {summary.min:.4f}  over {summary.count} image(s)")
    if summary.clip_i_mean is not None or summary.clip_t_mean is not None:
        lines.append(f"coherence (CLIP-I) {_num(summary.clip_i_mean)}  prompt fit (CLIP-T) {_num(summary.clip_t_mean)}")
    if report.identity is not None:
        from kstory.scoring.identity import identity_line

        lines.append(identity_line(report.identity))
    gate = f"gate: {summary.gate.upper()} (needs mean >= {summary.threshold:g})"
    if summary.missing_by:
        gate += f": the mean misses by {summary.missing_by:.4f}"
        needs = summary.replace_weakest_needs
        if needs is not None and needs <= SCALE_TOP:
            gate += f"; replacing {Path(summary.weakest[0].file).name} needs a frame scoring >= {needs:.4f}"
        elif needs is not None:
            gate += f"; no single new frame is enough: the scores must rise by {summary.missing_by * summary.count:.3f} in all"
    lines.append(gate)
    lines += [f"warning: {warning}" for warning in report.warnings]
    return "\n".join(lines)
