"""Upload with the real ``modelscope`` client against a loopback stand-in of the Hub endpoints it uses."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path

import pytest

import kstory  # noqa: F401
from kstory.core.errors import KstoryError
from kstory.submissions import upload_package
from kstory.submissions.naming import MIDDLE
from kstory.submissions.package import FORMAT, PACKAGE_FILE
from hub_standin import StandInHub

NAME = f"kteam-{MIDDLE}-fox"
MODEL_ID = f"alice/{NAME}"


@pytest.fixture
def token() -> str:
    return "ms-" + secrets.token_hex(16)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch) -> Path:
    """HOME, ModelScope's config/cache dirs and kstory's cache all under tmp_path, so a leak would land there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("MODELSCOPE_HOME", str(home / ".modelscope"))
    monkeypatch.setenv("MODELSCOPE_CACHE", str(home / "ms-cache"))
    monkeypatch.setenv("KSTORY_CACHE", str(tmp_path / "kstory-cache"))
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    return tmp_path


def make_package(root: Path, name: str = NAME, *, test: bool = False, gate: str = "pass") -> Path:
    """A small package with the index kstory writes (a real one takes a demo run; see test_submissions_package)."""
    files = {
        "README.md": "---\ntasks:\n- text-to-image-synthesis\n---\n# demo\n".encode(),
        "configuration.json": json.dumps({"framework": "Pytorch", "task": "text-to-image-synthesis",
                                          "base_model": "Kwai-Kolors/Kolors", "test_artefact": test,
                                          "test_reasons": ["made with the tiny model"] if test else []}).encode(),
        "lora.safetensors": secrets.token_bytes(200_000),
        "lora_kohya.safetensors": secrets.token_bytes(150_000),
        "manifest.json": b"{}",
    }
    files.update({f"frames/{i:02d}.png": secrets.token_bytes(5_000) for i in range(1, 9)})
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    index = {"format": FORMAT, "model_name": name, "gate": gate,
             "files": {rel: hashlib.sha256(data).hexdigest() for rel, data in sorted(files.items())}}
    (root / PACKAGE_FILE).write_text(json.dumps(index), encoding="utf-8")
    return root


def _no_token_anywhere(token: str, *roots: Path) -> None:
    needle = token.encode()
    for root in roots:
        if not root.exists():
            continue
        for path in root.rglob("*"):
            if path.is_file():
                assert needle not in path.read_bytes(), f"token written to {path}"


def test_dry_run_sends_nothing_and_needs_no_token(isolated: Path, capsys):
    package = make_package(isolated / "submission")
    with StandInHub("unused") as hub:
        result = upload_package(package, MODEL_ID, dry_run=True, endpoint=hub.endpoint)
        assert hub.requests == []
    text = result.render()
    assert result.dry_run and "would upload" in text and "frames/08.png" in text and PACKAGE_FILE in text


def test_upload_creates_model_survives_failures_and_leaks_no_token(isolated: Path, token: str, caplog):
    package = make_package(isolated / "submission")
    caplog.set_level(logging.DEBUG)
    with StandInHub(token) as hub:
        # Two 503s on model creation: the client does not retry POSTs, kstory's backoff loop does.
        hub.fail[("POST", "/api/v1/models")] = 2
        result = upload_package(package, MODEL_ID, token=token, endpoint=hub.endpoint, visibility="private",
                                backoff=0.01, retries=3)
        assert hub.injected == 2 and result.attempts == 3 and result.created
        repo = hub.repos[MODEL_ID]
        expected = {p.relative_to(package).as_posix() for p in package.rglob("*") if p.is_file()}
        assert set(repo.files) == expected
        assert all(repo.files[rel] == (package / rel).read_bytes() for rel in expected)
        assert repo.visibility == 1 and len(repo.commits) == 1
        assert "kstory submission" in repo.commits[0]["message"]
        assert hub.unknown == []
        # Nothing in a request body carries the token (it travels in headers only).
        assert not any(token.encode() in body for body in hub.bodies)
    assert token not in caplog.text
    _no_token_anywhere(token, isolated, Path(os.path.expanduser("~")))
    assert not list(package.glob(".*")), "the client's upload tracker must not land in the package"


def test_interrupted_upload_completes_on_rerun_without_duplicates(isolated: Path, token: str):
    package = make_package(isolated / "submission")
    with StandInHub(token) as hub:
        # The commit is refused after the blobs went up: the upload stops halfway.
        hub.fail[("POST", "/commit/")] = (1, 400)
        with pytest.raises(KstoryError) as caught:
            upload_package(package, MODEL_ID, token=token, endpoint=hub.endpoint, retries=0, backoff=0.01)
        assert token not in str(caught.value)
        assert hub.repos[MODEL_ID].files == {}
        puts_first = [p for m, p in hub.requests if m == "PUT"]
        assert puts_first, "the blobs should have been uploaded before the commit failed"
        result = upload_package(package, MODEL_ID, token=token, endpoint=hub.endpoint, retries=0)
        repo = hub.repos[MODEL_ID]
        assert not result.created and len(repo.commits) == 1
        assert len(repo.files) == len(list(p for p in package.rglob("*") if p.is_file()))
        puts = [p for m, p in hub.requests if m == "PUT"]
        assert len(puts) == len(set(puts)), "a blob was uploaded twice"
        creates = [p for m, p in hub.requests if m == "POST" and p == "/api/v1/models"]
        assert len(hub.repos) == 1 and len(creates) >= 1
        # A third run uploads nothing new.
        before = len(hub.requests)
        upload_package(package, MODEL_ID, token=token, endpoint=hub.endpoint, retries=0)
        assert len(repo.commits) == 1
        assert not [p for m, p in hub.requests[before:] if m in ("PUT",) or "/commit/" in p]


def test_bad_token_fails_fast_without_echoing_it(isolated: Path, token: str):
    package = make_package(isolated / "submission")
    wrong = "ms-" + secrets.token_hex(16)
    with StandInHub(token) as hub:
        with pytest.raises(KstoryError) as caught:
            upload_package(package, MODEL_ID, token=wrong, endpoint=hub.endpoint, retries=3, backoff=0.01)
        assert wrong not in str(caught.value) and token not in str(caught.value)
        assert len(hub.requests) < 20 and hub.repos == {}
    _no_token_anywhere(wrong, isolated)


def test_upload_refuses_bad_names_edited_packages_and_missing_token(isolated: Path, token: str):
    package = make_package(isolated / "submission")
    with pytest.raises(KstoryError, match="naming rule|lacks"):
        upload_package(package, "alice/not-the-rule", token=token, dry_run=True)
    with pytest.raises(KstoryError, match="owner/name"):
        upload_package(package, NAME, token=token, dry_run=True)
    with pytest.raises(KstoryError, match="built as"):
        upload_package(package, f"alice/other-{MIDDLE}-x", token=token, dry_run=True)
    with pytest.raises(KstoryError, match="no ModelScope token"):
        upload_package(package, MODEL_ID, endpoint="http://127.0.0.1:9")
    (package / "frames" / "03.png").write_bytes(b"edited")
    with pytest.raises(KstoryError, match="changed after packaging"):
        upload_package(package, MODEL_ID, token=token, dry_run=True)


def test_test_artefacts_failed_gates_and_failed_verifies_need_a_flag(isolated: Path, token: str):
    from types import SimpleNamespace

    from kstory.submissions.verify_record import verify_status, write_verify_record

    test = make_package(isolated / "test", test=True)
    with pytest.raises(KstoryError, match="test artefact") as caught:
        upload_package(test, MODEL_ID, dry_run=True)
    assert "--allow-test-model" in caught.value.render()
    allowed = upload_package(test, MODEL_ID, dry_run=True, allow_test_model=True)
    assert any("test artefact" in w for w in allowed.warnings) and "warning: " in allowed.render()

    failed = make_package(isolated / "failed", gate="fail")
    with pytest.raises(KstoryError, match="gate did not pass") as caught:
        upload_package(failed, MODEL_ID, dry_run=True)
    assert "--allow-failed-gate" in caught.value.render()
    assert upload_package(failed, MODEL_ID, dry_run=True, allow_failed_gate=True).warnings

    package = make_package(isolated / "pkg")
    assert verify_status(package) == "missing"
    assert any("not been verified" in w for w in upload_package(package, MODEL_ID, dry_run=True).warnings)
    bad = SimpleNamespace(verdict="different", passed=False, frames=[], scores_match=None)
    write_verify_record(package, bad)
    assert verify_status(package) == "failed"
    with pytest.raises(KstoryError, match="failed its last `kstory verify`") as caught:
        upload_package(package, MODEL_ID, dry_run=True)
    assert "--allow-failed-verify" in caught.value.render()
    good = SimpleNamespace(verdict="identical", passed=True, frames=[], scores_match=True)
    write_verify_record(package, good)
    assert verify_status(package) == "passed"
    result = upload_package(package, MODEL_ID, dry_run=True)
    assert result.warnings == [] and "verify.json" not in [path for path, _ in result.files]
    with StandInHub(token) as hub:  # the local verify record is neither a changed file nor uploaded
        upload_package(package, MODEL_ID, token=token, endpoint=hub.endpoint, retries=0)
        uploaded = hub.repos[MODEL_ID].files
        assert "verify.json" not in uploaded and "README.md" in uploaded
    index = json.loads((package / PACKAGE_FILE).read_text())
    index["created_at"] = "rebuilt"
    (package / PACKAGE_FILE).write_text(json.dumps(index))
    assert verify_status(package) == "missing"  # a record from before the last build does not count
