"""End-to-end `prep` runs with the real Data-Juicer on the synthetic style set and its defects."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from kstory.prep import prep
from kstory.prep.recipe import DEFAULT_RECIPE
from kstory.prep.synthetic import BIDI_WRAP, DEFECTS, DUPLICATE_OF, KEPT_FAITHFULLY, clean_name, make_style_dataset
from kstory.core.errors import KstoryError

N_CLEAN = 6
TRIGGER = "kst style"
EXTRA_COPY = "second_copy_of_0000.png"  # a third member of one hash group: the tracer pairs only two


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Content hash and mtime of every file under ``folder``."""
    return {
        str(path.relative_to(folder)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = make_style_dataset(tmp_path_factory.mktemp("input") / "style", n=N_CLEAN, seed=0)
    shutil.copyfile(folder / clean_name(0), folder / EXTRA_COPY)
    with open(folder / "metadata.csv", "a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow([EXTRA_COPY, "yet another copy of the first picture"])
    return folder


@pytest.fixture(scope="module")
def before(dataset: Path) -> dict[str, tuple[str, int]]:
    return snapshot(dataset)


@pytest.fixture(scope="module")
def run(dataset: Path, before: dict, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("runs") / "prepared"
    result = prep(dataset, out, trigger_word=TRIGGER, num_proc=2, show_progress=False)
    return result, json.loads(result.report_json.read_text(encoding="utf-8"))


def by_id(report: dict) -> dict[str, dict]:
    return {entry["id"]: entry for entry in report["samples"]}


def test_keeps_exactly_the_clean_samples(run) -> None:
    result, report = run
    kept = {entry["id"] for entry in report["samples"] if entry["status"] == "kept"}
    assert kept == {clean_name(i) for i in range(N_CLEAN)} | set(KEPT_FAITHFULLY)
    assert result.kept == N_CLEAN + len(KEPT_FAITHFULLY)
    assert result.dropped == len(DEFECTS) + 1 == report["counts"]["dropped"]
    assert report["counts"]["input"] == N_CLEAN + len(KEPT_FAITHFULLY) + len(DEFECTS) + 1


def test_every_drop_names_its_op_measurements_and_threshold(run) -> None:
    _, report = run
    entries = by_id(report)
    expected = {**DEFECTS, EXTRA_COPY: "image_deduplicator"}
    assert {name: entries[name]["op"] for name in expected} == expected
    for entry in entries.values():
        if entry["status"] == "dropped":
            assert entry["stage"] in ("pre-check", "data-juicer")
            assert entry["measured"], entry
    assert entries["small.png"]["measured"]["image_width"] == [200]
    assert entries["small.png"]["threshold"]["min_width"] == 512
    assert entries["wide.png"]["measured"]["aspect_ratios"] == [3.0]
    assert entries["wide.png"]["threshold"]["max_ratio"] == 2.0
    assert entries["blank.png"]["measured"]["image_sizes"][0] < 3 * 1024
    assert entries["spam_caption.png"]["measured"]["text_len"] == 0
    assert entries["spam_caption.png"]["threshold"]["min_len"] == 10
    assert entries["huge.png"]["measured"]["pixels"] == 20_000 * 20_000
    assert entries["huge.png"]["threshold"] == {"max_image_pixels": 64_000_000}
    assert "truncated" in entries["truncated.jpg"]["reason"]
    for outside in ("../outside.png", "/absolute/outside.png"):
        assert entries[outside]["stage"] == "pre-check" and "file" not in entries[outside]
        assert entries[outside]["reason"].startswith("not read: the path leads out of the dataset folder")
    assert entries["invisible_caption.png"]["measured"] == {"caption_chars": 0}
    assert result_counts_match(report)


def result_counts_match(report: dict) -> bool:
    per_op = {op["name"]: op["dropped"] for op in report["ops"]}
    return sum(per_op.values()) == report["counts"]["dropped"] and report["dropped_by"] == {
        k: v for k, v in per_op.items() if v
    }


def test_duplicates_name_what_they_duplicate(run) -> None:
    _, report = run
    entries = by_id(report)
    for copy, original in {**DUPLICATE_OF, EXTRA_COPY: clean_name(0)}.items():
        assert entries[copy]["duplicate_of"] == original
    phash = entries[clean_name(1)]["measured"]["__dj__imagehash"]
    assert entries["resized_0001.jpg"]["measured"]["__dj__imagehash"] == phash
    assert entries[EXTRA_COPY]["op"] == "image_deduplicator"


def read_captions(metadata_csv: Path) -> dict[str, str]:
    with open(metadata_csv, newline="", encoding="utf-8") as handle:
        return {row["file_name"]: row["text"] for row in csv.DictReader(handle)}


def test_captions_are_cleaned_and_carry_the_trigger(run, tmp_path: Path) -> None:
    result, report = run
    intended = read_captions(make_style_dataset(tmp_path / "clean", n=N_CLEAN, seed=0, defects=False) / "metadata.csv")
    captions = read_captions(result.metadata_csv)
    expected = {name: f"{TRIGGER}, {text}" for name, text in intended.items()}
    assert {name: captions[name] for name in intended} == expected
    messy = by_id(report)[clean_name(1)]["caption"]
    assert "<a href" in messy["original"] and "http" in messy["original"]
    assert messy["changed_by"] == ["clean_html_mapper", "clean_links_mapper", "whitespace_normalization_mapper"]


def test_metadata_csv_is_a_valid_diffsynth_training_folder(run) -> None:
    result, _ = run
    train = result.metadata_csv.parent
    with open(result.metadata_csv, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        assert next(reader) == ["file_name", "text"]
        rows = list(reader)
    names = [name for name, _ in rows]
    assert len(names) == len(set(names)) == N_CLEAN + len(KEPT_FAITHFULLY)
    assert sorted(path.name for path in train.iterdir()) == sorted(names + ["metadata.csv"])
    for name in names:
        with Image.open(train / name) as image:
            image.load()
    from diffsynth.data.simple_text_image import TextImageDataset  # DiffSynth's own Kolors LoRA dataset reader

    dataset = TextImageDataset(str(result.out), steps_per_epoch=1, height=256, width=256)
    assert sorted(Path(path).name for path in dataset.path) == sorted(names)
    assert dataset[0]["image"].shape == (3, 256, 256) and dataset[0]["text"].startswith(TRIGGER)


def test_16_bit_pictures_train_as_what_they_show(run, dataset: Path) -> None:
    """Scaled to 8 bits, never clamped to white; the grey one is re-encoded so any trainer reads it right."""
    import cv2

    from kstory.core.images import to_rgb8
    from kstory.train.cache import open_rgb

    result, report = run
    entries = by_id(report)
    assert entries["deep_grey.png"]["file"]["scaled_from"] == "I;16"
    assert entries["deep_rgb.png"]["file"]["scaled_from"] == "RGB;16B"
    train = result.metadata_csv.parent
    source = cv2.imread(str(dataset / "deep_grey.png"), cv2.IMREAD_UNCHANGED)
    assert source.dtype == np.uint16
    with Image.open(train / "deep_grey.png") as written:
        assert written.mode == "RGB"  # 8 bits now: DiffSynth's own reader gets the same pixels
        pixels = np.asarray(written)
    assert np.array_equal(pixels[:, :, 0], np.rint(source / 257).astype(np.uint8))
    assert pixels.min() < 200 and len(np.unique(pixels)) > 4
    source = cv2.imread(str(dataset / "deep_rgb.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    assert (train / "deep_rgb.png").read_bytes() == (dataset / "deep_rgb.png").read_bytes()
    assert np.array_equal(np.asarray(open_rgb(train / "deep_rgb.png")), (source >> 8).astype(np.uint8))
    with Image.open(dataset / "deep_grey.png") as original:
        original.load()
        assert np.array_equal(np.asarray(open_rgb(dataset / "deep_grey.png")), np.asarray(to_rgb8(original)))
    hashes = {entry["measured"]["__dj__imagehash"] for entry in report["samples"] if entry["status"] == "kept"}
    assert len(hashes) == result.kept


def test_invisible_characters_leave_captions_and_are_reported(run) -> None:
    result, report = run
    entries = by_id(report)
    bidi = entries["bidi_caption.png"]
    assert bidi["caption"]["original"].startswith(BIDI_WRAP[0]) and bidi["caption"]["original"].endswith(BIDI_WRAP[1])
    assert bidi["caption_cleaned"] == [
        "U+202C POP DIRECTIONAL FORMATTING x1",
        "U+202E RIGHT-TO-LEFT OVERRIDE x1",
        "U+FEFF ZERO WIDTH NO-BREAK SPACE x1",
    ]
    plain = bidi["caption"]["original"].removeprefix(BIDI_WRAP[0]).removesuffix(BIDI_WRAP[1])
    assert bidi["caption"]["final"] == f"{TRIGGER}, {plain}" == read_captions(result.metadata_csv)["bidi_caption.png"]
    assert len(entries["invisible_caption.png"]["caption_cleaned"]) == 3
    ops = {op["name"]: op for op in report["ops"]}
    assert ops["caption_cleaned"]["captions_changed"] == 2 and ops["caption_cleaned"]["dropped"] == 0
    markdown = result.report_md.read_text(encoding="utf-8")
    assert "## Captions cleaned (2)" in markdown and "| `bidi_caption.png` | U+202C" in markdown


def test_writes_report_md_and_log(run) -> None:
    result, report = run
    markdown = result.report_md.read_text(encoding="utf-8")
    ops = ("image_shape_filter", "image_deduplicator", "too_many_pixels", "missing_caption", "path_outside_dataset")
    for op in ops:
        assert f"`{op}`" in markdown
    assert "data-juicer:" in (result.out / "prep.log").read_text(encoding="utf-8")
    assert (result.out / "juicer" / "run" / "trace").is_dir()


def test_refuses_a_previous_run_without_overwrite_and_changes_nothing(run, dataset: Path) -> None:
    result, _ = run
    old = snapshot(result.out)
    with pytest.raises(KstoryError, match="previous prep run") as error:
        prep(dataset, result.out, show_progress=False)
    assert "--overwrite" in error.value.fix
    assert snapshot(result.out) == old
    assert not [path for path in result.out.parent.iterdir() if path.name.startswith(".")]


def test_the_same_prep_again_is_a_no_op_that_says_so(run, dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    result, _ = run
    old = snapshot(result.out)
    caplog.set_level(logging.INFO, logger="kstory")
    again = prep(dataset, result.out, trigger_word=TRIGGER, num_proc=1, show_progress=False)  # num_proc: same output
    assert (again.kept, again.dropped, again.dropped_by) == (result.kept, result.dropped, result.dropped_by)
    assert snapshot(result.out) == old
    assert "nothing to do" in caplog.text


def test_overwrite_replaces_the_run_as_a_whole(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    prep(dataset, out, trigger_word="first", show_progress=False)
    (out / "stale.txt").write_text("from the old run", encoding="utf-8")
    result = prep(dataset, out, overwrite=True, show_progress=False)
    assert not (out / "stale.txt").exists()
    assert "first" not in result.metadata_csv.read_text(encoding="utf-8")
    assert [path.name for path in tmp_path.iterdir()] == ["prepared"]


def test_fully_filtered_dataset_raises_naming_the_op_and_still_reports(dataset: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load(DEFAULT_RECIPE.read_text(encoding="utf-8"))
    for entry in recipe["process"]:
        if "image_shape_filter" in entry:
            entry["image_shape_filter"]["min_width"] = 4096
    strict = tmp_path / "strict.yaml"
    strict.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    out = tmp_path / "prepared"
    with pytest.raises(KstoryError, match=r"image_shape_filter dropped \d+") as error:
        prep(dataset, out, recipe=strict, show_progress=False)
    assert "image_shape_filter" in error.value.fix
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["counts"]["kept"] == 0
    entries = by_id(report)
    assert {entries[clean_name(i)]["op"] for i in range(N_CLEAN)} == {"image_shape_filter"}
    assert f"image_shape_filter dropped {report['dropped_by']['image_shape_filter']}" in str(error.value)
    assert not (out / "train").exists()


def test_input_folder_is_unchanged(run, dataset: Path, before: dict) -> None:
    assert snapshot(dataset) == before
