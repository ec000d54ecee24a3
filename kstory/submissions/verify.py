"""``kstory verify SUBMISSION``: regenerate every frame from the package alone and compare.

Uses only what the package holds (``manifest.json``, ``story.yaml``, the
DiffSynth-format LoRA, the ``guides/`` images) plus the base model and the
ControlNets named in the manifest, each checked by its sha256. The spec is
re-run with every frame's guides replaced by the packaged guide images
(``type: image``), so no reference photo or pose detector is needed. Each
frame is reported identical (same PNG bytes) or with its PSNR/SSIM against
the packaged frame; the frames are then re-scored and compared with
``scores.json``. A generated character sheet is made again from the
prompt and seed the manifest records (then the frames from it) and compared
too. A package keeps the order chosen on the dashboard: its
frame N is the story's frame ``story_frame`` of the manifest, regenerated
from that spec entry.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from PIL import Image

from kstory.core.errors import KstoryError
from kstory.core.hashing import sha256_file
from kstory.core.logs import get_logger
from kstory.submissions.package import check_files, read_package

log = get_logger("package")
SCORE_TOLERANCE = 1e-3
SSIM_WINDOW = 7


@dataclass
class FrameCheck:
    index: int
    file: str
    identical: bool
    expected_sha256: str
    regenerated_sha256: str
    psnr: float | None = None  # dB; None when identical (infinite)
    ssim: float | None = None
    prompt_matches: bool = True


@dataclass
class ScoreCheck:
    file: str
    recorded: float | None
    rescored: float
    diff: float | None


@dataclass
class VerifyReport:
    submission: str
    verdict: str  # identical | different | modified
    passed: bool
    file_problems: list[str] = field(default_factory=list)
    frames: list[FrameCheck] = field(default_factory=list)
    sheet: FrameCheck | None = None  # the character sheet made again (index 0), when the story has one
    scores: list[ScoreCheck] = field(default_factory=list)
    recorded_mean: float | None = None
    rescored_mean: float | None = None
    scores_match: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def render(self) -> str:
        lines = [f"{self.submission}: {self.verdict.upper()}"]
        lines += [f"  file: {p}" for p in self.file_problems]
        for f in self.frames:
            state = "identical" if f.identical else f"differs: PSNR {f.psnr:.2f} dB, SSIM {f.ssim:.4f}"
            lines.append(f"  frame {f.index:2d} {f.file}: {state}" + ("" if f.prompt_matches else " (prompt differs)"))
        if self.sheet is not None:
            state = ("identical" if self.sheet.identical else "not made again" if self.sheet.psnr is None
                     else f"differs: PSNR {self.sheet.psnr:.2f} dB, SSIM {self.sheet.ssim:.4f}")
            lines.append(f"  character sheet {self.sheet.file}: {state}")
        if self.rescored_mean is not None:
            lines.append(f"  scores: recorded mean {self.recorded_mean}, re-scored {self.rescored_mean:.4f} "
                         f"({'match' if self.scores_match else 'DIFFER'})")
        return "\n".join(lines)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def _box(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over every k x k window ('valid' positions), per channel, via summed-area tables."""
    s = np.pad(x, ((1, 0), (1, 0), (0, 0))).cumsum(0).cumsum(1)
    return (s[k:, k:] - s[:-k, k:] - s[k:, :-k] + s[:-k, :-k]) / (k * k)


def ssim(a: np.ndarray, b: np.ndarray, window: int = SSIM_WINDOW) -> float:
    """Mean SSIM (uniform window, the usual constants) over the channels of two HxWxC uint8 images."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    if x.ndim == 2:
        x, y = x[..., None], y[..., None]
    k = min(window, x.shape[0], x.shape[1])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _box(x, k), _box(y, k)
    vx, vy = _box(x * x, k) - mx * mx, _box(y * y, k) - my * my
    cxy = _box(x * y, k) - mx * my
    value = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(value.mean())


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _controlnets(manifest: dict[str, Any], given: dict[str, Path] | None, cache_dir: Path | None) -> dict[str, Path]:
    """Local weights for each ControlNet of the manifest, found by sha256."""
    from kstory.story.controlnets import identify

    wanted = manifest.get("controlnets") or {}
    if not wanted:
        return {}
    candidates: list[Path] = [Path(p) for p in (given or {}).values()]
    if (manifest.get("model") or {}).get("tiny"):
        from kstory.story import build_tiny_controlnets

        candidates += list(build_tiny_controlnets(cache_dir).values())
    candidates += [Path(cn["path"]) for cn in wanted.values() if cn.get("path")]
    found: dict[str, Path] = {}
    for name, cn in wanted.items():
        preferred = [Path(given[name])] if given and name in given else []
        for path in preferred + candidates:
            if not path.exists():
                continue
            try:
                if identify(name, path).sha256 == cn["sha256"]:
                    found[name] = path
                    break
            except KstoryError:
                continue
        else:
            raise KstoryError(
                f"ControlNet {name!r} ({cn.get('kind')}, sha256 {cn['sha256'][:12]}) not found",
                path=cn.get("path"), fix=f"pass --controlnet {name}=PATH with the weights the story used",
            )
    return found


def story_frame(key: str, frame: dict[str, Any]) -> int:
    """The story's number of package frame ``key`` (packages keep the dashboard's order; older ones the story's)."""
    return int(frame.get("story_frame", key))


def _package_spec(submission: Path, manifest: dict[str, Any], target: Path) -> Path:
    """story.yaml with each frame's seed and prompt from the manifest and its guides replaced by the packaged
    guide images."""
    spec = yaml.safe_load((submission / "story.yaml").read_text(encoding="utf-8")) or {}
    spec.pop("controlnets", None)  # given explicitly, found by hash
    _package_reference(submission, manifest, spec)
    _package_face(submission, manifest, spec)
    frames = spec.get("frames") or []
    for key, frame in manifest["frames"].items():
        index = story_frame(key, frame) - 1
        if not 0 <= index < len(frames):
            raise KstoryError(f"manifest frame {key} is not in story.yaml", path=submission / "story.yaml",
                              fix="repackage the run")
        frames[index]["seed"] = frame["seed"]  # the manifest is the source of truth for each frame
        frames[index]["prompt"] = frame["frame_prompt"]
        frames[index]["sampler"] = frame.get("sampler", "ddim")  # manifests before samplers were chosen: ddim
        frames[index]["guides"] = [
            {"type": "image", "image": str((submission / g["file"]).resolve()), "controlnet": g["controlnet"],
             "task": g.get("task"), "scale": g["scale"], "start": g["start"], "end": g["end"]}
            for g in frame.get("guides", [])
        ]
    target.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return target


def _package_face(submission: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> None:
    """The spec's face becomes the packaged embedding and crop (no insightface needed); the adapter is found by hash."""
    face = (spec.get("character") or {}).get("face")
    if not face:
        return
    entry = next((f["face_id"] for f in manifest["frames"].values() if f.get("face_id")), None)
    if entry is None:
        raise KstoryError("story.yaml has a face but no frame records one", path=submission / "manifest.json",
                          fix="repackage the run")
    for name in ("adapter", "image"):
        face.pop(name, None)
    face["embedding"] = str((submission / entry["embedding"]["file"]).resolve())
    face["crop"] = str((submission / entry["crop"]["file"]).resolve())


def _repairs(submission: Path, manifest: dict[str, Any], inpaint_model: str | Path | None,
             cache: Path | None) -> dict[int, list[Any]]:
    """Story frame -> its recorded repairs, replayed from the masks and pictures the package ships.

    An inpainting model is not shipped (it is Kolors-Inpainting, the same for everyone): it is found by its
    recorded fingerprint, here before anything generates, so a missing one is named at once.
    """
    from kstory.story.inpaint_model import find_recorded_inpaint_model
    from kstory.story.repair import Repair

    repairs = {story_frame(key, frame): [Repair.from_record(r, submission) for r in frame["repairs"]]
               for key, frame in manifest["frames"].items() if frame.get("repairs")}
    for repair in (r for chain in repairs.values() for r in chain if r.inpaint_model):
        repair.inpaint_path = find_recorded_inpaint_model(repair.inpaint_model, inpaint_model, cache).spec
    return repairs


def _package_reference(submission: Path, manifest: dict[str, Any], spec: dict[str, Any]) -> None:
    """The spec's character reference image becomes the packaged copy, a character sheet the recorded prompt and
    seed (it is made again, then the frames from it); the adapter is passed found by hash."""
    reference = (spec.get("character") or {}).get("reference")
    if not reference:
        return
    reference.pop("adapter", None)
    if reference.get("sheet") is not None:
        from kstory.story.character_sheet import RECORD, sheet_spec

        record = manifest.get(RECORD)
        if not record:
            raise KstoryError("story.yaml has a character sheet but manifest.json records none",
                              path=submission / "manifest.json", fix="repackage the run")
        reference["sheet"] = sheet_spec(record)
        return
    files = {((f.get("ip_adapter") or {}).get("reference") or {}).get("file") for f in manifest["frames"].values()}
    files.discard(None)
    if reference.get("image") is not None:
        if not files:
            raise KstoryError("story.yaml has a character reference image but no frame records one",
                              path=submission / "manifest.json", fix="repackage the run")
        reference["image"] = str((submission / sorted(files)[0]).resolve())


def _scoring_model(info: dict[str, Any] | None, default: str) -> str:
    if not info:
        return default
    return "tiny" if info.get("random_weights") else str(info.get("identity") or default)


def verify_package(
    submission_dir: str | Path, *, model: str = "tiny", cache_dir: str | Path | None = None,
    controlnets: dict[str, Path] | None = None, rescore: bool = True, device: str | None = None,
    ip_adapter: str | Path | None = None, inpaint_model: str | Path | None = None,
    loras: Sequence[Path] = (),
) -> VerifyReport:
    """Regenerate the package's frames and compare; see the module docstring.

    ``verdict``: ``identical`` (every frame byte-identical, files intact, scores
    match), ``different`` (some frame or score differs; PSNR/SSIM say how much)
    or ``modified`` (a packaged file changed after packaging).
    ``loras`` supplies the user's own LoRAs the package records but does not ship (found by sha256).
    """
    import torch

    from kstory.core.models import resolve_model
    from kstory.story import generate_story
    from kstory.story.character_sheet import RECORD as SHEET_RECORD

    submission = Path(submission_dir).resolve()
    read_package(submission)  # a KstoryError if this is not a package
    problems = check_files(submission)
    manifest = json.loads((submission / "manifest.json").read_text(encoding="utf-8"))
    cache = Path(cache_dir) if cache_dir is not None else None
    weights = resolve_model(model, cache)
    recorded = (manifest.get("model") or {}).get("fingerprint")
    if recorded != weights.fingerprint:
        raise KstoryError(
            f"the package was made with {(manifest.get('model') or {}).get('identity')}, not {weights.identity}",
            fix="pass --model with the base model the story was generated on",
        )
    lora = submission / "lora.safetensors"
    if not lora.is_file():
        raise KstoryError("the package has no lora.safetensors", path=lora, fix="repackage the run")
    nets = _controlnets(manifest, controlnets, cache)
    from kstory.submissions.user_loras import verify_requests

    user_loras = verify_requests(submission, manifest, loras)
    lora_info = manifest.get("lora") or {}
    from kstory.story.reference_records import find_recorded_adapter

    adapter = find_recorded_adapter(manifest.get("ip_adapter"), ip_adapter, cache)
    from kstory.story.face_references import find_recorded_face_adapter

    face_adapter = find_recorded_face_adapter(manifest.get("face_adapter"), None, cache)
    repairs = _repairs(submission, manifest, inpaint_model, cache)
    dtype = getattr(torch, manifest.get("dtype", "float32"))
    device = device or manifest.get("device") or None
    report = VerifyReport(str(submission), "identical", True, file_problems=problems)
    with tempfile.TemporaryDirectory(prefix="kstory-verify-") as tmp:
        spec = _package_spec(submission, manifest, Path(tmp) / "story.yaml")
        # The recorded memory profile: its batch cap, tiled decoding and text-encoder device decide pixels too.
        memory = (manifest.get("memory") or {}).get("profile") or "none"
        result = generate_story(spec, Path(tmp) / "regen", model=model, lora=lora, lora_scale=lora_info.get("scale"),
                                controlnets=nets, cache_dir=cache, device=device, torch_dtype=dtype, memory=memory,
                                repairs=repairs, ip_adapter=adapter.path if adapter else None,
                                text_encoder_quant=(manifest.get("memory") or {}).get("text_encoder_quant", "none"),
                                loras=user_loras, face_adapter=face_adapter.path if face_adapter else None)
        regen_manifest = json.loads(result.manifest_path.read_text(encoding="utf-8"))
        for key, frame in sorted(manifest["frames"].items(), key=lambda kv: int(kv[0])):
            index = story_frame(key, frame)
            packaged, regenerated = submission / frame["file"], result.frames[index]
            got = sha256_file(regenerated)
            on_disk = sha256_file(packaged) if packaged.is_file() else ""
            check = FrameCheck(int(key), frame["file"], got == frame["sha256"] == on_disk, frame["sha256"], got,
                               prompt_matches=regen_manifest["frames"][str(index)]["prompt"] == frame["prompt"])
            if not check.identical:
                a = _pixels(regenerated)
                b = _pixels(packaged) if packaged.is_file() else np.zeros_like(a)
                check.psnr, check.ssim = (psnr(a, b), ssim(a, b)) if a.shape == b.shape else (0.0, 0.0)
            report.frames.append(check)
        if manifest.get(SHEET_RECORD):
            report.sheet = _sheet_check(submission, manifest[SHEET_RECORD], regen_manifest.get(SHEET_RECORD),
                                        result.out_dir)
        if rescore and (submission / "scores.json").is_file():
            _rescore(report, submission, manifest, result.frames)
    if problems:
        report.verdict, report.passed = "modified", False
    elif (not all(f.identical and f.prompt_matches for f in report.frames) or report.scores_match is False
          or (report.sheet is not None and not report.sheet.identical)):
        report.verdict, report.passed = "different", False
    log.info("verify %s: %s", submission, report.verdict)
    return report


def _sheet_check(submission: Path, record: dict[str, Any], regenerated: dict[str, Any] | None,
                 regen_dir: Path) -> FrameCheck:
    """The character sheet made again against the packaged one (same PNG bytes, else PSNR/SSIM)."""
    packaged = submission / record["file"]
    got = (regenerated or {}).get("sha256", "")
    on_disk = sha256_file(packaged) if packaged.is_file() else ""
    check = FrameCheck(0, record["file"], got == record["sha256"] == on_disk, record["sha256"], got,
                       prompt_matches=(regenerated or {}).get("prompt") == record["prompt"])
    if not check.identical and regenerated:
        a = _pixels(regen_dir / regenerated["file"])
        b = _pixels(packaged) if packaged.is_file() else np.zeros_like(a)
        check.psnr, check.ssim = (psnr(a, b), ssim(a, b)) if a.shape == b.shape else (0.0, 0.0)
    return check


def _rescore(report: VerifyReport, submission: Path, manifest: dict[str, Any], frames: dict[int, Path]) -> None:
    from kstory.scoring import score_images

    scores = json.loads((submission / "scores.json").read_text(encoding="utf-8"))
    models = scores.get("summary", {}).get("models", {})
    recorded = {Path(i["file"]).name: i.get("aesthetic") for i in scores.get("images", [])}
    ordered = sorted(manifest["frames"].items(), key=lambda kv: int(kv[0]))
    paths = [frames[story_frame(k, f)] for k, f in ordered]
    prompts = {str(frames[story_frame(k, f)]): f["prompt"] for k, f in ordered}
    # the regenerated files carry the story's numbers, the package's files its own order
    packaged = {frames[story_frame(k, f)].name: Path(f["file"]).name for k, f in ordered}
    clip = models.get("clip")
    fresh = score_images(paths, aesthetic_model=_scoring_model(models.get("aesthetic"), "tiny"),
                         clip_model=_scoring_model(clip, "tiny") if clip else None, prompts=prompts,
                         threshold=scores.get("summary", {}).get("threshold", 6.0))
    for image in fresh.images:
        name = packaged.get(Path(image.file).name, Path(image.file).name)
        old = recorded.get(name)
        diff = None if old is None else abs(image.aesthetic - old)
        report.scores.append(ScoreCheck(name, old, image.aesthetic, diff))
    report.recorded_mean = scores.get("summary", {}).get("mean")
    report.rescored_mean = fresh.summary.mean
    report.scores_match = all(s.diff is not None and s.diff <= SCORE_TOLERANCE for s in report.scores) and (
        report.recorded_mean is not None and fresh.summary.mean is not None
        and abs(report.recorded_mean - fresh.summary.mean) <= SCORE_TOLERANCE)
