"""The publishing stages of ``kstory run``: package (and verify) and upload, when the config asks for them.

Package runs only with a ``package:`` section; upload only with an
``upload:`` section that is enabled (``enabled: true`` or ``kstory run
--upload``), so a run never publishes by surprise. Both fingerprint content:
the story's manifest (frames, LoRAs, seeds by hash), scores.json and the
dashboard's order and locks for the package; the package index for the upload.
"""

from __future__ import annotations

from pathlib import Path

from kstory.core.atomic import write_json
from kstory.core.config import RunConfig
from kstory.core.hashing import path_digest
from kstory.core.logs import get_logger
from kstory.core.rundir import RunDir, fingerprint

log = get_logger("run")
UPLOAD_RECORD = ".upload.json"  # hidden: the package's file check and the upload itself skip it


def package_digest(config: RunConfig, run: RunDir) -> str:
    return fingerprint("package", config.package.model_dump(mode="json"), path_digest(run.story / "manifest.json"),
                       path_digest(run.scores), path_digest(run.story / "review.json"))


def package_run(config: RunConfig, run: RunDir) -> None:
    from kstory.cli.stages import controlnet_paths
    from kstory.submissions import build_package, verify_package
    from kstory.submissions.verify_record import write_verify_record

    settings = config.package
    out = build_package(run.root, team=settings.team, suffix=settings.suffix, description=settings.description,
                        owner=settings.owner, allow_failed_gate=settings.allow_failed_gate,
                        allow_test_model=settings.allow_test_model)
    if not settings.verify:
        log.info("package: not verified (package.verify: false); `kstory verify %s` checks it", out)
        return
    story = config.story
    report = verify_package(out, model=config.model, cache_dir=config.cache_dir,
                            controlnets=controlnet_paths(story.controlnets, config.cache_dir) or None if story else None,
                            loras=[lora.path for lora in story.loras] if story else ())
    write_verify_record(out, report)
    log.info("%s", report.render())
    if not report.passed:
        log.warning("package: verify says %s; `kstory upload` refuses it unless --allow-failed-verify", report.verdict)


def upload_model_id(config: RunConfig) -> str:
    from kstory.submissions.naming import model_name

    if config.upload.model_id:
        return config.upload.model_id
    return f"{config.package.owner}/{model_name(config.package.team, config.package.suffix)}"


def upload_output(run: RunDir) -> Path:
    return run.submission / UPLOAD_RECORD


def upload_digest(config: RunConfig, run: RunDir) -> str:
    settings = config.upload.model_dump(mode="json", exclude={"enabled"})
    return fingerprint("upload", settings, upload_model_id(config), path_digest(run.submission / "kstory_package.json"))


def upload_run(config: RunConfig, run: RunDir) -> None:
    from kstory.submissions import upload_package

    settings, package = config.upload, config.package
    result = upload_package(run.submission, upload_model_id(config), visibility=settings.visibility,
                            dry_run=settings.dry_run, endpoint=settings.endpoint,
                            allow_test_model=package.allow_test_model, allow_failed_gate=package.allow_failed_gate)
    log.info("%s", result.render())
    write_json(upload_output(run), {"model_id": upload_model_id(config), "dry_run": settings.dry_run,
                                    "endpoint": settings.endpoint, "files": len(result.files)})
