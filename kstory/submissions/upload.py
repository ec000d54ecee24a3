"""``kstory upload SUBMISSION --model-id owner/name``: publish a package with the ``modelscope`` client.

The token comes from ``token=``, ``$MODELSCOPE_API_TOKEN`` or an interactive
prompt. It only ever lives in memory: this module does not call
``HubApi.login`` (which stores cookies and a git token under
``~/.modelscope/credentials``) but hands the token to ``HubApi(token=...)``,
which authenticates each request with it; error messages are scrubbed of it
before they are raised or logged.

Steps: refuse a package whose files changed since packaging; refuse, unless
told, a test artefact (tiny or random-weight models, a LoRA not on Kolors, as
the package recorded it), a package whose gate failed and one whose last
``kstory verify`` failed (warn when it was never verified); create the model
(with the chosen visibility) when it does not exist, then ``upload_folder``
with a commit message. The client's upload tracker lives in kstory's cache,
not in the package, so a second run after an interruption skips what was
already committed (no duplicate files or commits). Transient failures
(network, timeouts, 5xx, rate limits, failed batches) are retried with
exponential backoff.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kstory.core.errors import KstoryError
from kstory.core.logs import get_logger
from kstory.submissions.naming import validate_model_name
from kstory.submissions.package import VERIFY_FILE, check_files, read_package
from kstory.submissions.provenance import ALLOW_FLAG, Provenance, from_record, provenance
from kstory.submissions.verify_record import verify_status

log = get_logger("package")
TOKEN_ENV = "MODELSCOPE_API_TOKEN"
VISIBILITY = {"public": 5, "internal": 3, "private": 1}  # ModelScope's Visibility codes
IGNORE = [".*", "**/.*", VERIFY_FILE]  # trackers, editor files, the local verify record: never part of the repo


@dataclass
class UploadResult:
    model_id: str
    endpoint: str | None
    dry_run: bool
    created: bool = False
    attempts: int = 0
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, bytes)
    commit_message: str = ""
    visibility: str = "public"
    url: str | None = None
    warnings: list[str] = field(default_factory=list)

    def render(self) -> str:
        head = "would upload" if self.dry_run else "uploaded"
        total = sum(size for _, size in self.files)
        lines = [f"{head} {len(self.files)} files ({total / 1e6:.1f} MB) to {self.model_id} "
                 f"({self.visibility}) at {self.endpoint or 'the default ModelScope endpoint'}",
                 f"commit message: {self.commit_message}"]
        if self.dry_run:
            lines.append("create the model if missing, then upload:")
            lines += [f"  {path}  {size} bytes" for path, size in self.files]
        lines += [f"warning: {text}" for text in self.warnings]
        return "\n".join(lines)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "***") if token else text


def _resolve_token(token: str | None) -> str:
    token = token or os.environ.get(TOKEN_ENV)
    if not token and sys.stdin is not None and sys.stdin.isatty():
        token = getpass.getpass("ModelScope access token (not stored): ")
    if not token or not token.strip():
        raise KstoryError(
            "no ModelScope token",
            fix=f"set {TOKEN_ENV} (an access token from modelscope.cn/my/myaccesstoken) or run interactively",
        )
    return token.strip()


def _tracker(submission: Path, model_id: str) -> Path:
    from kstory.core.models import default_cache_dir

    key = hashlib.sha256(f"{submission.resolve()}\n{model_id}".encode()).hexdigest()[:24]
    path = default_cache_dir() / "uploads" / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _is_transient(error: BaseException) -> bool:
    from modelscope_hub import errors as e

    if isinstance(error, (e.AuthenticationError, e.PermissionDeniedError, e.InvalidParameter, e.QuotaExceededError)):
        return False
    if isinstance(error, (e.NetworkError, e.ServerError, e.RateLimitError, e.StorageError, ConnectionError,
                          TimeoutError)):
        return True
    status = getattr(error, "status_code", None)
    return isinstance(status, int) and (status >= 500 or status == 429)


def package_provenance(submission: Path) -> Provenance:
    """What the package recorded about its base model (configuration.json); for a package built before that
    record existed, worked out from its own manifest.json, scores.json and LoRA metadata."""
    import json

    def load(name: str) -> dict[str, Any]:
        try:
            data = json.loads((submission / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise KstoryError(f"unreadable {name} ({error})", path=submission / name,
                              fix="run `kstory package` again") from None
        return data if isinstance(data, dict) else {}

    recorded = from_record(load("configuration.json"))
    if recorded is not None:
        return recorded
    from kstory.core.lora import read_lora

    _, meta = read_lora(submission / "lora.safetensors")
    return provenance(load("manifest.json"), load("scores.json"), meta.get("kstory.base_model"))


def publish_checks(submission: Path, index: dict[str, Any], *, allow_test_model: bool, allow_failed_gate: bool,
                   allow_failed_verify: bool) -> list[str]:
    """Refuse (KstoryError) what must not be published unless allowed; return the warnings for what may be."""
    warnings = []
    origin = package_provenance(submission)
    if origin.is_test:
        if not allow_test_model:
            raise KstoryError("the package is a test artefact, not a Kolors LoRA: " + "; ".join(origin.reasons),
                              path=submission / "configuration.json",
                              fix=f"package a run made with the real models, or pass {ALLOW_FLAG} to upload it anyway")
        warnings.append(f"uploading a test artefact (base model {origin.base_model}), allowed by {ALLOW_FLAG}")
    gate = index.get("gate")
    if gate != "pass":
        if not allow_failed_gate:
            raise KstoryError(f"the package's score gate did not pass (gate: {gate})", path=submission / "scores.json",
                              fix="improve the frames and package again, or pass --allow-failed-gate")
        warnings.append(f"the score gate did not pass (gate: {gate}), allowed by --allow-failed-gate")
    state = verify_status(submission)
    if state == "failed":
        if not allow_failed_verify:
            raise KstoryError("the package failed its last `kstory verify` (the frames did not regenerate identically)",
                              path=submission / VERIFY_FILE,
                              fix=f"fix the package and run `kstory verify {submission}` again, "
                                  "or pass --allow-failed-verify")
        warnings.append("the package failed `kstory verify`, allowed by --allow-failed-verify")
    elif state == "missing":
        warnings.append(f"the package has not been verified since it was built: run `kstory verify {submission}` first")
    for text in warnings:
        log.debug("warning: %s", text)  # shown once, in the result; kept in the run's log
    return warnings


def upload_package(
    submission_dir: str | Path, model_id: str, *, token: str | None = None, visibility: str = "public",
    dry_run: bool = False, endpoint: str | None = None, retries: int = 3, commit_message: str | None = None,
    backoff: float = 1.0, allow_test_model: bool = False, allow_failed_gate: bool = False,
    allow_failed_verify: bool = False,
) -> UploadResult:
    """Upload the package to ``model_id`` (``owner/<team>-可图Kolors训练-<suffix>``); see the module docstring.

    The publishing checks (:func:`publish_checks`) apply to a dry run too, so it shows what a real upload would do.
    """
    submission = Path(submission_dir).resolve()
    if "/" not in model_id or model_id.count("/") != 1 or not all(model_id.split("/")):
        raise KstoryError(f"model id {model_id!r} is not owner/name", fix="pass --model-id owner/name")
    validate_model_name(model_id)
    if visibility not in VISIBILITY:
        raise KstoryError(f"unknown visibility {visibility!r}", fix=f"use one of {', '.join(VISIBILITY)}")
    index = read_package(submission)
    problems = check_files(submission)
    if problems:
        raise KstoryError("the package changed after packaging: " + "; ".join(problems[:5]), path=submission,
                          fix="run `kstory package` again")
    name = model_id.split("/")[1]
    if index.get("model_name") != name:
        raise KstoryError(f"the package was built as {index.get('model_name')!r}, not {name!r}", path=submission,
                          fix="upload to owner/" + str(index.get("model_name")) + " or package again with that name")
    warnings = publish_checks(submission, index, allow_test_model=allow_test_model,
                              allow_failed_gate=allow_failed_gate, allow_failed_verify=allow_failed_verify)
    files = [(rel, (submission / rel).stat().st_size) for rel in sorted([*index["files"], "kstory_package.json"])]
    message = commit_message or f"kstory submission {name} ({len(files)} files)"
    result = UploadResult(model_id, endpoint, dry_run, files=files, commit_message=message, visibility=visibility,
                          warnings=warnings)
    if dry_run:
        log.info("%s", result.render())
        return result

    secret = _resolve_token(token)
    from modelscope.hub.api import HubApi

    api = HubApi(endpoint=endpoint, token=secret)
    result.endpoint = api.endpoint
    delay = backoff
    for attempt in range(1, retries + 2):  # bounded: 1 try + `retries` retries
        result.attempts = attempt
        try:
            if not api.repo_exists(model_id):
                api.create_model(model_id, visibility=VISIBILITY[visibility], license="Apache License 2.0")
                result.created = True
                log.info("created model %s (%s)", model_id, visibility)
            api.upload_folder(repo_id=model_id, folder_path=str(submission), commit_message=message,
                              ignore_patterns=IGNORE, tracker_path=str(_tracker(submission, model_id)),
                              disable_tqdm=True)
            break
        except Exception as error:  # noqa: BLE001 - classified below, re-raised without the token
            text = _scrub(f"{type(error).__name__}: {error}", secret)
            if attempt > retries or not _is_transient(error):
                raise KstoryError(f"upload to {model_id} failed after {attempt} attempt(s): {text}",
                                  fix="check the token's write permission and the network, then run it again "
                                      "(finished files are skipped)") from None
            log.warning("upload attempt %d failed (%s); retrying in %.1f s", attempt, text, delay)
            time.sleep(delay)
            delay *= 2
    result.url = f"{result.endpoint.rstrip('/')}/models/{model_id}"
    log.info("uploaded %s in %d attempt(s)", model_id, result.attempts)
    return result
