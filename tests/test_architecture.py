"""The house: the layers hold (import-linter), and nothing in a user's working folder can shadow kstory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports() -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_hold() -> None:
    result = lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 kept, 0 broken" in result.stdout


def test_a_core_module_importing_a_stage_breaks_the_contract() -> None:
    probe = REPO / "kstory" / "core" / "_layering_probe.py"
    probe.write_text('"""A deliberate violation: the core importing a stage."""\n\nimport kstory.story.run  # noqa\n',
                     encoding="utf-8")
    try:
        result = lint_imports()
    finally:
        probe.unlink()
    assert result.returncode != 0
    assert "kstory.core._layering_probe -> kstory.story.run" in result.stdout, result.stdout


def test_a_users_modules_named_like_the_stages_cannot_shadow_kstory(tmp_path: Path) -> None:
    for name in ("train", "app", "story", "scoring", "submissions", "data_prep", "cli", "core"):
        (tmp_path / f"{name}.py").write_text("raise RuntimeError('the user module was imported')\n", encoding="utf-8")
    code = ("import kstory.core.config, kstory.train, kstory.story, kstory.app.actions, kstory.cli; "
            "from kstory.cli import main; raise SystemExit(main(['--help']))")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "usage: kstory" in result.stdout
