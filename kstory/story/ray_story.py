"""A story's batches on a pool of Ray workers, written by this process exactly as ``run_plans`` writes them.

Batches are formed as in one process (``story_batches``) and sent whole, so
every frame shares its batch with the same frames and gets the same pixels.
Cross-batch dependencies decide the units: with consistent attention all
batches are one unit on one worker (the attention bank lives in its memory);
frames that use another frame as their reference run after the first wave is
written, with that frame's PNG sent along; a character sheet is made in this
process before any unit starts. Results are written in story order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from kstory.core.config import RaySettings
from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.core.ray_cluster import ray_cluster, ray_installed
from kstory.story.character_sheet import make_sheet, pending_sheet
from kstory.story.consistent_attention import SharingSettings
from kstory.story.generate import FramePlan, Session
from kstory.story.manifest import frame_name
from kstory.story.run import FrameWork, encoded_plans, record_batch, write_inputs

log = get_logger("story")
SETTING = "ray.address (--ray)"


def use_ray(settings: RaySettings | None) -> bool:
    """Ray when configured and installed; configured but missing runs in-process, said once."""
    if settings is None:
        return False
    if not ray_installed():
        log.info("Ray is not installed: the story runs in this process (pip install 'ray[default]' to use %s)",
                 settings.address)
        return False
    return True


def job_units(groups: list[list[FramePlan]], sharing: SharingSettings | None) -> list[list[list[int]]]:
    """Stages of units (positions in ``groups``): a stage starts once the one before is written."""
    if sharing is not None:
        log.info("consistent attention: the story's batches run on one worker, which holds the attention bank")
        return [[list(range(len(groups)))]]
    later = {i for i, batch in enumerate(groups) if any(_frame_reference(p) for p in batch)}
    stages = [[i for i in range(len(groups)) if i not in later], sorted(later)]
    return [[[i] for i in stage] for stage in stages if stage]


def worker_count(ray: Any, settings: RaySettings, device: str, units: int) -> tuple[int, float, float]:
    """(workers, GPUs each, CPUs each): one per GPU on CUDA, else one per ``cpus_per_worker`` CPUs."""
    resources = ray.cluster_resources()
    if torch.device(device).type == "cuda":
        available = int(resources.get("GPU", 0))
        if available < 1:
            raise KstoryError(f"the story runs on CUDA but the Ray cluster at {settings.address!r} has no GPU",
                              fix="join a cluster with GPU nodes, or run the story without ray: / --ray")
        count, gpus, cpus = settings.workers or available, 1.0, 1.0
    else:
        available = int(resources.get("CPU", 0) // settings.cpus_per_worker)
        count, gpus, cpus = settings.workers or max(1, available), 0.0, settings.cpus_per_worker
    return max(1, min(count, units)), gpus, cpus


def run_plans_on_ray(
    out_dir: Path, groups: list[list[FramePlan]], keep: set[int], *, settings: RaySettings,
    load_session: Callable[[], Session], manifest: dict[str, Any], earlier: dict[str, Any], release: str,
    work: Mapping[int, FrameWork], save: Callable[[dict[str, Any]], None], sharing: SharingSettings | None,
    device: str,
) -> tuple[list[int], float, int | None]:
    """``run_plans`` with the denoising on Ray workers; the same files, records and log lines come out."""
    from kstory.story.ray_pool import StoryPool

    plans = [plan for batch in groups for plan in batch]
    faces = [plan.index for plan in plans if getattr(plan, "face", None) is not None]
    if faces:  # the workers' sessions carry no face adapter yet
        raise KstoryError(f"frame(s) {', '.join(map(str, faces))} use character.face, which Ray workers do not run "
                          "yet", fix="generate this story without ray: / --ray")
    sheet = pending_sheet(plans, keep)
    if sheet is not None:  # made here first; the workers take it as a reference picture
        make_sheet(load_session(), sheet, plans, manifest, release)
        torch.cuda.empty_cache()  # that session is gone: its cached GPU memory goes back for the workers
    guide_hashes = write_inputs(out_dir, plans, keep, work)
    adapter = load_session().references.weights  # a Session loads nothing until it is used
    stages = job_units(groups, sharing)
    generated: list[int] = []
    seconds = 0.0
    with ray_cluster(settings.address, setting=SETTING) as cluster:
        import ray

        log.info("Ray cluster: %s", cluster)
        count, gpus, cpus = worker_count(ray, settings, device, max(len(stage) for stage in stages))
        pool = StoryPool(load_session, count, gpus=gpus, cpus=cpus, threads=torch.get_num_threads())
        bar = tqdm(total=len(keep), desc="story frames", unit="frame")
        try:
            pool.broadcast("prepare", groups, keep, release, encoded_plans(plans, keep), sharing)
            for stage in stages:
                waiting, finished = list(stage), {}

                def done(unit: list[int], result: list[tuple[list[Any], float]], worker: Any) -> None:
                    nonlocal seconds
                    finished[tuple(unit)] = (result, worker)
                    while waiting and tuple(waiting[0]) in finished:  # write in story order, as one process does
                        first = waiting.pop(0)
                        results, by = finished.pop(tuple(first))
                        for position, (images, batch_seconds) in zip(first, results):
                            seconds += batch_seconds
                            written = record_batch(out_dir, groups[position], images, batch_seconds, keep,
                                                   manifest=manifest, earlier=earlier, guide_hashes=guide_hashes,
                                                   work=work, adapter=adapter)
                            generated.extend(written)
                            save(manifest)
                            bar.update(len(written))
                            log.info("frames %s done in %.1f s on worker %s", ", ".join(map(str, written)),
                                     batch_seconds, by.name)

                pool.run(stage, lambda unit: (unit, reference_frames(out_dir, [groups[i] for i in unit])), done)
        finally:
            bar.close()
            pool.close()
    return generated, seconds, None


def reference_frames(out_dir: Path, batches: list[list[FramePlan]]) -> dict[int, bytes]:
    """The PNGs of the frames these batches use as their reference (written by an earlier stage)."""
    frames = {}
    for plan in (p for batch in batches for p in batch):
        if not _frame_reference(plan):
            continue
        path = out_dir / "frames" / f"{frame_name(plan.reference.frame)}.png"
        if not path.is_file():
            raise KstoryError(f"frame {plan.reference.frame} is the character reference but its picture is not "
                              "available", fix="generate the whole story (the reference frame first)")
        frames[plan.reference.frame] = path.read_bytes()
        plan.reference.sha256 = hashlib.sha256(frames[plan.reference.frame]).hexdigest()  # as the worker sees it
    return frames


def _frame_reference(plan: FramePlan) -> bool:
    return plan.reference is not None and plan.reference.frame is not None
