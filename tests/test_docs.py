"""README and docs stay true to the code: set-up commands, CI, config example, links."""

from __future__ import annotations

import re
from pathlib import Path

from kstory.core.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_shows_exactly_two_one_line_setup_commands() -> None:
    commands = setup_commands()
    assert len(commands) == 2
    assert all("\n" not in command for command in commands)
    assert commands[0].endswith("kstory demo")
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = setup_commands()[1].replace("-q ", "")
    assert test_command in ci.replace("-q ", "")


def test_documented_config_example_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    example = re.search(r"```yaml\n(.*?)```", text, re.S).group(1)
    path = tmp_path / "kstory.yaml"
    path.write_text(example, encoding="utf-8")
    config = load_config(path)
    assert config.name == "mine" and config.train.rank == 16


def test_readme_links_point_at_files() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(((?:docs|notebooks|bench)/[^)#]*)\)", readme):
        assert (ROOT / target).exists(), target
