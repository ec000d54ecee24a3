"""A story's batches on a pool of Ray workers (a local Ray instance): the same frames, bit for bit, as in one
process; a worker killed mid-story has its batches done by the other, and each frame is written once."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import pytest
import yaml

import kstory.story as story
from kstory.core.config import RaySettings
from kstory.core.errors import KstoryError

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_spec(path: Path, frames: int, batch_size: int) -> Path:
    """Frames of two sizes, several batches of each: batch composition matters to the pixels."""
    items = [{"prompt": f"a fox, scene {i}", "seed": 100 + i, **({"width": 128, "height": 64} if i % 3 == 0 else {})}
             for i in range(1, frames + 1)]
    spec = {"title": "ray story", "frame_count": frames,
            "character": {"trigger_word": "kstory style", "description": "a fox", "negative_prompt": "blurry"},
            "defaults": {"width": 64, "height": 64, "steps": 2, "cfg_scale": 5.0},
            "generation": {"batch_size": batch_size}, "frames": items}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> Path:
    return write_spec(tmp_path_factory.mktemp("spec") / "story.yaml", frames=6, batch_size=2)


@pytest.fixture(scope="module")
def in_process(spec, tmp_path_factory):
    return story.generate_story(spec, tmp_path_factory.mktemp("one") / "story", model="tiny")


def test_unreachable_ray_address_names_the_setting(spec, tmp_path) -> None:
    assert not ray.is_initialized()
    with pytest.raises(KstoryError, match=r"ray\.address \(--ray\)") as caught:
        story.generate_story(spec, tmp_path / "story", model="tiny", ray=RaySettings(address="127.0.0.1:1"))
    assert "fix:" in str(caught.value)
    assert not (tmp_path / "story").exists()


@pytest.fixture(scope="module")
def local_ray():
    from kstory.core.ray_cluster import worker_runtime_env

    ray.init(num_cpus=2, object_store_memory=100_000_000, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())
    yield
    ray.shutdown()


def manifest_of(result) -> dict:
    return json.loads(result.manifest_path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_two_ray_workers_make_the_in_process_story_bit_for_bit(spec, in_process, local_ray, tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="kstory.story"):
        result = story.generate_story(spec, tmp_path / "story", model="tiny", ray=RaySettings(workers=2))
    assert result.frame_hashes == in_process.frame_hashes and sorted(result.frame_hashes) == list(range(1, 7))
    ours, theirs = manifest_of(result), manifest_of(in_process)
    assert ours["setup_id"] == theirs["setup_id"]
    assert {k: v["batch"] for k, v in ours["frames"].items()} == {k: v["batch"] for k, v in theirs["frames"].items()}
    assert list(ours["frames"]) == list(theirs["frames"])
    workers = {m.group(1) for r in caplog.records if (m := re.search(r"on worker (\S+)", r.getMessage()))}
    assert len(workers) == 2, "both workers denoised batches"


class KillAfterFirstBatch(logging.Handler):
    """Kills the worker that finished the first batch, as a node that goes away mid-story."""

    def __init__(self) -> None:
        super().__init__()
        self.killed: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        found = re.search(r"on worker (\S+)", record.getMessage())
        if found and self.killed is None:
            self.killed = found.group(1)
            worker = ray.get_actor(self.killed)
            ray.kill(worker)
            for _ in range(300):  # ray.kill returns at once; make sure the worker is gone before it can take more work
                try:
                    ray.get(worker.__ray_ready__.remote(), timeout=2)
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                    return
                time.sleep(0.1)


@pytest.mark.slow
def test_a_killed_worker_has_its_batches_done_by_the_other(spec, in_process, local_ray, tmp_path, caplog) -> None:
    killer = KillAfterFirstBatch()
    logger = logging.getLogger("kstory.story")
    logger.addHandler(killer)
    try:
        with caplog.at_level(logging.INFO, logger="kstory.story"):
            result = story.generate_story(spec, tmp_path / "story", model="tiny", ray=RaySettings(workers=2))
    finally:
        logger.removeHandler(killer)
    assert killer.killed is not None
    assert result.frame_hashes == in_process.frame_hashes and result.generated == list(range(1, 7))
    messages = [r.getMessage() for r in caplog.records]
    written = [int(i) for m in messages if " on worker " in m for i in re.findall(r"\d+", m.split(" done ")[0])]
    assert sorted(written) == list(range(1, 7)), "every frame written exactly once"
    done = [m for m in messages if " on worker " in m]
    assert all(killer.killed not in m for m in done[1:]), "the killed worker made nothing after its first batch"
    # The pool finds a dead worker when it hands it work; when the other worker took every batch left, it never does.
    failed = [m for m in messages if m.startswith(f"story worker {killer.killed}") and "failed" in m]
    if failed:
        assert "host" in failed[0] and "node" in failed[0], messages


@pytest.mark.slow
def test_a_character_sheet_is_made_first_and_the_workers_use_it(local_ray, tmp_path) -> None:
    path = write_spec(tmp_path / "story.yaml", frames=4, batch_size=2)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    spec["character"]["reference"] = {"sheet": {"prompt": "character sheet", "seed": 5}, "adapter": "tiny",
                                      "frames": [2, 4]}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    alone = story.generate_story(path, tmp_path / "one", model="tiny")
    result = story.generate_story(path, tmp_path / "story", model="tiny", ray=RaySettings(workers=2))
    assert result.frame_hashes == alone.frame_hashes and result.generated == [1, 2, 3, 4]
    assert manifest_of(result)["character_sheet"]["sha256"] == manifest_of(alone)["character_sheet"]["sha256"]
    assert (result.out_dir / "character-sheet.png").read_bytes() == (alone.out_dir / "character-sheet.png").read_bytes()
