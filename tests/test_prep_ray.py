"""`prep` on Data-Juicer's RayExecutor (a local Ray instance) keeps and explains exactly what the default executor does."""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from pathlib import Path

import pytest

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from kstory.core.errors import KstoryError
from kstory.prep import prep
from kstory.prep.executors import choose_executor
from kstory.prep.synthetic import DEFECTS, clean_name, make_style_dataset

ray = pytest.importorskip("ray")

EXTRA_COPY = "second_copy_of_0000.png"  # three copies of one picture: the Ray tracer pairs none of them


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_style_dataset(tmp_path_factory.mktemp("input") / "style", n=3, seed=0)
    shutil.copyfile(folder / clean_name(0), folder / EXTRA_COPY)
    with open(folder / "metadata.csv", "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow([EXTRA_COPY, "yet another copy of the first picture"])
    return folder


def test_ray_missing_runs_in_process_with_one_log_line(monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as when it is not installed
    with caplog.at_level(logging.INFO, logger="kstory.prep.executors"):
        assert choose_executor("ray") == "default"
    assert [record.getMessage() for record in caplog.records if "Ray is not installed" in record.getMessage()]
    assert len(caplog.records) == 1


def test_unknown_executor_names_the_setting() -> None:
    with pytest.raises(KstoryError, match=r"prep\.executor"):
        choose_executor("spark")


@pytest.mark.parametrize("address", ["127.0.0.1:1", "not-an-address"])
def test_unreachable_ray_address_names_the_setting(dataset: Path, tmp_path: Path, address: str) -> None:
    assert not ray.is_initialized()
    with pytest.raises(KstoryError, match=r"prep\.ray_address") as caught:
        prep(dataset, tmp_path / "out", executor="ray", ray_address=address, show_progress=False)
    assert "fix:" in str(caught.value)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def local_ray():
    """A small local Ray instance, as a user who calls ray.init before kstory would start it."""
    from kstory.core.ray_cluster import worker_runtime_env

    ray.init(num_cpus=2, object_store_memory=100_000_000, include_dashboard=False, log_to_driver=False,
             runtime_env=worker_runtime_env())
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def both(dataset: Path, local_ray, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for executor in ("default", "ray"):
        result = prep(dataset, root / executor, trigger_word="kst", executor=executor, show_progress=False)
        results[executor] = (result, json.loads(result.report_json.read_text(encoding="utf-8")))
    return results


@pytest.mark.slow
def test_ray_keeps_and_explains_exactly_what_the_default_executor_does(both) -> None:
    (default, expected), (on_ray, got) = both["default"], both["ray"]
    # the default tracer pairs only two copies of a picture, so its report has no caption for the third;
    # under Ray every duplicate's caption as the deduplicator saw it is known
    third = next(entry for entry in expected["samples"] if entry["id"] == EXTRA_COPY)
    assert third["caption"]["at_drop"] is None
    third["caption"]["at_drop"] = "yet another copy of the first picture"
    assert got["samples"] == expected["samples"]
    assert got["ops"] == expected["ops"] and got["dropped_by"] == expected["dropped_by"]
    assert default.metadata_csv.read_bytes() == on_ray.metadata_csv.read_bytes()
    for picture in default.metadata_csv.parent.iterdir():
        assert (on_ray.metadata_csv.parent / picture.name).read_bytes() == picture.read_bytes()
    entries = {entry["id"]: entry for entry in got["samples"]}
    # the run covers a filter drop, a duplicate pair and a third copy that no Ray trace pairs
    assert entries["small.png"]["op"] == "image_shape_filter" and entries["small.png"]["measured"]["image_width"] == [200]
    assert entries[EXTRA_COPY]["op"] == "image_deduplicator" and entries[EXTRA_COPY]["duplicate_of"] == clean_name(0)
    assert {name: entries[name]["op"] for name in DEFECTS} == DEFECTS
    assert "kstory_ray_image_deduplicator" in (on_ray.out / "juicer" / "recipe.yaml").read_text(encoding="utf-8")


@pytest.mark.slow
def test_what_a_capped_ray_tracer_leaves_out_is_replayed(both, tmp_path: Path) -> None:
    """With the tracer capped at one sample per op, the replay must still explain every drop and caption edit."""
    from kstory.prep.recipe import load_recipe
    from kstory.prep.ray_executor import run_juicer_on_ray

    on_ray, expected = both["ray"]
    rows = [json.loads(line) for line in (on_ray.out / "juicer" / "input.jsonl").read_text(encoding="utf-8").splitlines()]
    work = tmp_path / "juicer"
    work.mkdir()
    run = run_juicer_on_ray(load_recipe(None), rows, work_dir=work, address="local", trace_num=1)
    traced = [line for path in (work / "run" / "trace").glob("sample_trace-*.jsonl")
              for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(traced) < len(rows)  # the cap really left records out
    juicer_drops = {e["id"]: e for e in expected["samples"] if e.get("stage") == "data-juicer"}
    assert {sample_id: drop.op for sample_id, drop in run.drops.items()} == {
        sample_id: entry["op"] for sample_id, entry in juicer_drops.items()}
    for sample_id, drop in run.drops.items():
        assert drop.measured == juicer_drops[sample_id]["measured"]
        assert drop.duplicate_of == juicer_drops[sample_id].get("duplicate_of")
    kept = [e for e in expected["samples"] if e["status"] == "kept"]
    assert [row["id"] for row in run.kept] == [e["id"] for e in kept]
    assert {i: edits for i, edits in run.caption_edits.items()} == {
        e["id"]: e["caption"]["changed_by"] for e in expected["samples"]
        if e.get("stage") != "pre-check" and e["caption"].get("changed_by")}
