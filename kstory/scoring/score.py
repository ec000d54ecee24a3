"""``score_images``: load each model once, stream decoded images through them in batches, decide the gate."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

import kstory
from kstory.core.atomic import write_json
from kstory.core.logs import get_logger
from kstory.core.errors import KstoryError
from kstory.core.models import default_cache_dir
from kstory.core.hashing import sha256_file
from kstory.scoring.aesthetic import DEFAULT_LAION_CLIP, load_aesthetic_model
from kstory.scoring.clip import OpenClip, load_open_clip
from kstory.scoring.coherence import clip_i_to_others, clip_t, mean_to_others
from kstory.scoring.dreamsim import DreamSim, load_dreamsim
from kstory.scoring.identity import identity_scores
from kstory.scoring.images import Decoded, Skipped, collect_files, decode_all
from kstory.scoring.report import ImageScore, ModelInfo, ScoreReport, SkippedFile, Timing, summarise

log = get_logger("score")

AUTO = "auto"
REAL_CLIP = "ViT-L-14:openai"


def _batches(stream: Iterator[Decoded | Skipped], size: int, skipped: list[Skipped]) -> Iterator[list[Decoded]]:
    batch: list[Decoded] = []
    for item in stream:
        if isinstance(item, Skipped):
            log.warning("skipped %s: %s", item.path, item.reason)
            skipped.append(item)
            continue
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _stack(batch: list[Decoded], key: str, device: torch.device) -> torch.Tensor:
    return torch.stack([item.inputs[key] for item in batch]).to(device)


def _hash_all(infos: list[tuple[ModelInfo, list[Path]]]) -> None:
    for info, files in infos:
        info.files = {file.name: sha256_file(file) for file in files}


def _prompt_for(path: Path, prompts: dict[str, str]) -> str | None:
    return prompts.get(path.name, prompts.get(str(path)))


def score_images(
    images: Iterable[Path | str],
    *,
    aesthetic_model: Path | str = "tiny",
    clip_model: str | Path | None = AUTO,
    aesthetic_clip: str | Path = DEFAULT_LAION_CLIP,
    prompts: dict[str, str] | None = None,
    threshold: float = 6.0,
    batch_size: int = 8,
    out: Path | None = None,
    dreamsim: bool = False,
    device: str | None = None,
    cache_dir: Path | None = None,
    workers: int | None = None,
) -> ScoreReport:
    """Score files and folders (every file directly inside) and write ``out`` (scores.json) if given.

    ``aesthetic_model``: ``tiny``, ``kolors-challenge``, a predictor folder, or
    LAION's MLP file (its open_clip tower is ``aesthetic_clip``). ``clip_model``:
    an open_clip spec (see :mod:`scoring.clip`), ``auto`` (``tiny`` with the tiny
    predictor, else ViT-L-14:openai) or None for no CLIP-T/CLIP-I. Files that
    are not readable images are skipped and listed, never fatal; if scoring is
    interrupted, what was scored is still written, marked incomplete.
    """
    started = time.perf_counter()
    files = collect_files(images)
    prompts = prompts or {}
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    aesthetic = load_aesthetic_model(aesthetic_model, device=dev, cache_dir=cache, clip=aesthetic_clip)
    chosen_automatically = clip_model == AUTO
    if chosen_automatically:
        clip_model = "tiny" if aesthetic.info.random_weights else REAL_CLIP
    clip: OpenClip | None = None
    if clip_model is not None:
        try:
            clip = load_open_clip(clip_model, device=dev, cache_dir=cache)
        except KstoryError as error:
            if not chosen_automatically:
                raise
            # CLIP-T and CLIP-I are extras; the gate needs only the aesthetic predictor, so a missing
            # CLIP download must not stop it. A CLIP model the user named still fails loudly.
            log.warning("CLIP weights for prompt fit and coherence are not available (%s): scoring aesthetics only, "
                        "the gate still applies; give --clip-model NAME:WEIGHTS or a folder for CLIP-T and CLIP-I",
                        error.message)
    sim: DreamSim | None = load_dreamsim(device=dev, cache_dir=cache) if dreamsim else None
    models = {"aesthetic": aesthetic.info} | ({"clip": clip.info} if clip else {}) | ({"dreamsim": sim.info} if sim else {})
    for info in models.values():
        if info.random_weights:
            log.warning("%s model %s has RANDOM WEIGHTS: its scores mean nothing (a test model)", info.role, info.identity)

    preprocess = {"aesthetic": aesthetic.preprocess}
    if clip:
        preprocess["clip"] = clip.preprocess
    if sim:
        preprocess["dreamsim"] = sim.prepare
    loaded = time.perf_counter()
    decoded: list[Decoded] = []
    skipped: list[Skipped] = []
    scores: list[float] = []
    clip_embeds: list[torch.Tensor] = []
    dreamsim_embeds: list[torch.Tensor] = []
    complete = False
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kstory-hash") as hasher:
        hashing: Future[None] = hasher.submit(_hash_all, [
            (aesthetic.info, aesthetic.weight_files), *([(clip.info, clip.weight_files)] if clip else [])])
        try:
            for batch in _batches(decode_all(files, preprocess, workers=workers, window=4 * batch_size), batch_size, skipped):
                batch_scores = aesthetic.score(_stack(batch, "aesthetic", dev)).tolist()
                clip_batch = clip.encode_images(_stack(batch, "clip", dev)).float().cpu() if clip else None
                sim_batch = sim.embed(_stack(batch, "dreamsim", dev)).float().cpu() if sim else None
                # committed together, so an interruption never leaves a frame half scored
                scores += batch_scores
                clip_embeds += [clip_batch] if clip_batch is not None else []
                dreamsim_embeds += [sim_batch] if sim_batch is not None else []
                decoded += batch
                log.debug("scored %d of %d files", len(decoded) + len(skipped), len(files))
            complete = True
        finally:
            hashing.result()
            scored = time.perf_counter()
            report = _report(decoded, skipped, scores, clip, clip_embeds, dreamsim_embeds, prompts, dev,
                             threshold, models, complete, Timing(load_s=loaded - started, score_s=scored - loaded))
            if out is not None:
                _keep_previous(Path(out))
                write_json(out, report.to_json())
                log.info("scores written to %s", out)
    return report


def _report(
    decoded: list[Decoded], skipped: list[Skipped], scores: list[float], clip: OpenClip | None,
    clip_embeds: list[torch.Tensor], dreamsim_embeds: list[torch.Tensor], prompts: dict[str, str],
    device: torch.device, threshold: float, models: dict[str, ModelInfo], complete: bool, timing: Timing,
) -> ScoreReport:
    n = len(scores)
    texts = [_prompt_for(item.path, prompts) for item in decoded]
    fit: list[float | None] = [None] * n
    to_others: list[float] | None = None
    image_embeds: torch.Tensor | None = None
    if clip and clip_embeds:
        image_embeds = torch.cat(clip_embeds)
        to_others = clip_i_to_others(image_embeds)
        with_prompt = [i for i, text in enumerate(texts) if text]
        if with_prompt:
            text_embeds = clip.encode_texts([texts[i] for i in with_prompt], device).float().cpu()
            for i, value in zip(with_prompt, clip_t(image_embeds[with_prompt], text_embeds)):
                fit[i] = value
    distances = None
    if dreamsim_embeds:
        unit = torch.nn.functional.normalize(torch.cat(dreamsim_embeds), dim=-1)
        distances = mean_to_others(1 - unit @ unit.T)
    entries = [
        ImageScore(
            file=str(item.path), sha256=item.sha256, width=item.size[0], height=item.size[1], mode=item.mode,
            aesthetic=scores[i], prompt=texts[i], clip_t=fit[i],
            clip_i_to_others=to_others[i] if to_others else None,
            dreamsim_to_others=distances[i] if distances else None,
        )
        for i, item in enumerate(decoded)
    ]
    warnings = [f"{info.role} model {info.identity} has random weights: its scores mean nothing"
                for info in models.values() if info.random_weights]
    if skipped:
        warnings.append(f"{len(skipped)} file(s) skipped; the organisers' loop reads every file in the folder "
                        "and would crash on them: remove them before uploading")
    matched = {item.path.name for item in decoded} | {str(item.path) for item in decoded}
    unused = sorted(set(prompts) - matched)
    if unused:
        warnings.append(f"prompts for files that were not scored: {', '.join(unused)}")
    if not complete:
        warnings.append(f"incomplete: stopped after {n + len(skipped)} file(s); the gate is not decided")
    summary = summarise(entries, skipped=len(skipped), threshold=threshold, models=models, complete=complete)
    identity = None
    if image_embeds is not None:
        identity = identity_scores([str(item.path) for item in decoded], image_embeds, fit,
                                   torch.cat(dreamsim_embeds) if dreamsim_embeds else None)
    timing.images_per_second = n / timing.score_s if timing.score_s > 0 else None
    return ScoreReport(
        summary=summary, images=entries, skipped=[SkippedFile(file=str(s.path), reason=s.reason) for s in skipped],
        warnings=warnings, complete=complete, identity=identity, timing=timing, kstory_version=kstory.__version__,
    )


def _keep_previous(out: Path) -> None:
    """A scores.json about to be replaced goes to the run's .history/ (scores are never just overwritten)."""
    from kstory.core.rundir import RunDir, move_to_history

    if out.is_file():
        moved = move_to_history(RunDir(out.parent), out)
        log.info("previous scores kept at %s", moved)
