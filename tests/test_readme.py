"""The README's `## Use` commands, run in order on the tiny preset in a temporary folder.

The lines are run as printed except for these swaps, which put them on the tiny
preset offline: ``--model kolors`` -> ``--model tiny``, ``--aesthetic-model
kolors-challenge`` -> ``tiny``, the pose ControlNet folder -> ``tiny``, small
training settings (``--resolution 128 --steps 4``), and ``--allow-test-model
--allow-failed-gate`` for ``package`` and ``upload`` (the tiny models make a
test artefact whose random scores need not pass the gate). Skipped:
``kstory model kolors`` (downloads Kolors), ``kstory app`` (a server; tests/test_app.py
covers it). ``kstory upload`` runs with ``--dry-run`` (no hub is contacted; the real
client is tested against the loopback stand-in in tests/test_submissions_upload.py).

``kstory verify`` runs after ``kstory reroll`` and must regenerate every frame,
the re-rolled one included, bit for bit (the manifest is the source of truth).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

import kstory  # noqa: F401

README = Path(__file__).resolve().parent.parent / "README.md"
SKIPPED = {"model": "downloads Kwai-Kolors/Kolors", "app": "starts a server; tests/test_app.py covers the dashboard"}
SWAPS = [
    ("--model kolors", "--model tiny"),
    ("--aesthetic-model kolors-challenge", "--aesthetic-model tiny"),
    ("pose=models/Kolors-ControlNet-Pose", "pose=tiny"),
    ("--ip-adapter models/Kolors-IP-Adapter-Plus", "--ip-adapter tiny"),
]
EXTRA = {
    "train": ["--resolution", "128", "--steps", "4"],
    "package": ["--allow-test-model", "--allow-failed-gate"],
    "upload": ["--dry-run", "--allow-test-model", "--allow-failed-gate"],
}


def use_lines() -> list[str]:
    """The `kstory ...` lines of the README's `## Use` block, continuations joined."""
    section = README.read_text(encoding="utf-8").split("\n## Use\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    lines = block.replace("\\\n", " ").splitlines()
    return [line.strip() for line in lines if line.strip().startswith("kstory ")]


def use_commands() -> list[list[str]]:
    """Those lines as argument lists (comments dropped)."""
    return [shlex.split(line, comments=True) for line in use_lines()]


def _inputs(root: Path) -> None:
    """What the README expects the user to have: my_images/ and runs/mine/story.yaml (poses only, one ControlNet)."""
    from kstory.prep.synthetic import make_style_dataset
    from kstory.story import make_demo_spec

    make_style_dataset(root / "my_images", n=12, seed=0)
    spec_path = make_demo_spec(root / "runs" / "mine" / "story.yaml", "inkwash style")
    spec = yaml.safe_load(spec_path.read_text(encoding="utf-8"))
    spec["frames"][-1]["guides"] = [{"type": "pose", "pose": "waving", "scale": 0.8}]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    from PIL import Image, ImageDraw

    mask = Image.new("L", (spec["defaults"]["width"], spec["defaults"]["height"]))
    ImageDraw.Draw(mask).rectangle((40, 40, 80, 80), fill=255)  # `kstory inpaint ... --mask hand.png`
    mask.save(root / "hand.png")


def _run_config(root: Path) -> None:
    """`kstory run runs/mine/kstory.yaml`: the demo's config copied and edited, as the README says."""
    config = yaml.safe_load((root / "runs" / "demo" / "kstory.yaml").read_text(encoding="utf-8"))
    config.update(name="mine")
    config["prep"]["source"] = str(root / "my_images")
    config["prep"]["trigger_word"] = "inkwash style"
    config["story"] = {"spec": str(root / "runs" / "mine" / "story.yaml"), "controlnets": {"pose": "tiny"}}
    (root / "runs" / "mine" / "kstory.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def test_readme_lists_the_commands_this_test_runs() -> None:
    names = [argv[1] for argv in use_commands()]
    assert names[:2] == ["demo", "prep"] and {"score", "package", "verify", "upload", "run"} <= set(names)
    assert set(SKIPPED) <= set(names)


def test_readme_use_block_runs_on_the_tiny_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    from kstory.cli import main
    from kstory.submissions.verify_record import verify_status

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODELSCOPE_API_TOKEN", raising=False)
    _inputs(tmp_path)
    ran, statuses = [], {}
    for line in use_lines():
        command = shlex.split(line, comments=True)[1]
        if command in SKIPPED:
            continue
        for old, new in SWAPS:
            line = line.replace(old, new)
        args = shlex.split(line, comments=True)[1:] + EXTRA.get(command, [])
        if command == "run":
            _run_config(tmp_path)
        status = main(args)
        out = capsys.readouterr()
        expected = {"score": (0, 3), "search": (0, 3)}.get(command, (0,))  # the gate on random scores
        assert status in expected, f"kstory {' '.join(args)} -> {status}\n{out.out}\n{out.err}"
        ran.append(command)
        statuses[command] = status
        if command == "status":  # after `kstory run`, every stage of the README's run is up to date
            assert all(f"{stage} " in out.out and "up to date" in out.out for stage in ("prep", "train", "story"))
            assert "out of date" not in out.out, out.out
        if command == "score":  # `kstory score RUN`: the manifest's 8 frames with their prompts, into RUN/scores.json
            scores = json.loads((tmp_path / "runs" / "mine" / "scores.json").read_text(encoding="utf-8"))
            assert len(scores["images"]) == 8 and all(image["prompt"] for image in scores["images"])
    assert ran == ["demo", "prep", "train", "story", "reroll", "inpaint", "search", "score", "package", "verify",
                   "upload", "run", "status", "doctor"]
    run = tmp_path / "runs" / "mine"
    log = (run / "kstory.log").read_text(encoding="utf-8")
    for command in ("prep", "train", "story", "reroll", "score", "package", "verify", "upload"):
        assert f"kstory {command} on" in log, command
    assert verify_status(run / "submission") == "passed"
