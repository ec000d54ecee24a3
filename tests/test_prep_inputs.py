"""Fast checks of prep's input handling, pre-checks and output safety (no Data-Juicer run)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from data_prep import prep
from data_prep.layout import check_out, with_trigger
from data_prep.recipe import load_recipe, no_auto_install
from data_prep.sources import is_modelscope_id, scan_folder
from data_prep.synthetic import make_style_dataset
from data_prep.validate import check_sample, check_samples
from kstory.errors import KstoryError


def picture(path: Path, size: tuple[int, int] = (64, 48), fmt: str = "PNG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 120, 40)).save(path, format=fmt)
    return path


def test_sidecar_captions(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a cat", encoding="utf-8")
    picture(tmp_path / "sub" / "b.jpg", fmt="JPEG")
    (tmp_path / "clip.mp4").write_bytes(b"\x00\x00")
    (tmp_path / "clip.txt").write_text("a clip", encoding="utf-8")
    (tmp_path / "README.md").write_text("notes", encoding="utf-8")
    (tmp_path / ".hidden.png").write_bytes(b"")
    scan = scan_folder(tmp_path)
    assert [(s.id, s.caption) for s in scan.samples] == [
        ("a.png", "a cat"),
        ("clip.mp4", "a clip"),
        ("sub/b.jpg", None),
    ]
    assert scan.ignored == ["README.md"]


def test_metadata_jsonl_with_image_and_caption_keys(tmp_path: Path) -> None:
    picture(tmp_path / "x.png")
    lines = [{"image": ["x.png"], "caption": "a fox"}, {"image": "x.png", "caption": None}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines), encoding="utf-8")
    scan = scan_folder(tmp_path)
    assert [(s.id, s.caption) for s in scan.samples] == [("x.png", "a fox"), ("x.png#2", None)]
    assert scan.captions_from == "metadata.jsonl"


def test_metadata_csv_without_usable_columns_is_a_user_error(tmp_path: Path) -> None:
    (tmp_path / "metadata.csv").write_text("path,text\nx.png,a fox\n", encoding="utf-8")
    with pytest.raises(KstoryError, match="names the image") as error:
        scan_folder(tmp_path)
    assert error.value.path == tmp_path / "metadata.csv"
    (tmp_path / "metadata.csv").write_text("image,label\nx.png,a fox\n", encoding="utf-8")
    with pytest.raises(KstoryError, match="holds the caption"):
        scan_folder(tmp_path)


def test_bad_jsonl_line_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(KstoryError, match="line 2"):
        scan_folder(tmp_path)


def test_modelscope_ids() -> None:
    assert is_modelscope_id("modelscope://AI-ModelScope/lowres_anime")
    assert is_modelscope_id("ms://AI-ModelScope/lowres_anime?subset=default&split=train")
    assert not is_modelscope_id("data/lowres_anime")


def test_pre_checks_catch_bad_files_even_after_data_juicer_relaxes_pillow(tmp_path: Path) -> None:
    import data_juicer  # noqa: F401  (sets ImageFile.LOAD_TRUNCATED_IMAGES = True)

    good = picture(tmp_path / "ok.jpg", (640, 480), "JPEG")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "text.png").write_text("hello", encoding="utf-8")
    picture(tmp_path / "big.png", (300, 200))
    (tmp_path / "metadata.csv").write_text(
        "file_name,text\nok.jpg,fine\ncut.jpg,cut\ntext.png,text\nbig.png,big\ngone.png,gone\nsub/ok.png,same stem\n",
        encoding="utf-8",
    )
    picture(tmp_path / "sub" / "ok.png")
    checks = {
        c.sample.id: c for c in check_samples(scan_folder(tmp_path).samples, [], max_pixels=50_000, show_progress=False)
    }
    assert {name: c.reason for name, c in checks.items()} == {
        "ok.jpg": "too_many_pixels",
        "cut.jpg": "too_many_pixels",
        "text.png": "not_an_image",
        "big.png": "too_many_pixels",
        "gone.png": "file_not_found",
        "sub/ok.png": None,
    }
    assert checks["big.png"].measured["pixels"] == 60_000 and checks["big.png"].threshold == {
        "max_image_pixels": 50_000
    }
    relaxed = {
        c.sample.id: c for c in check_samples(scan_folder(tmp_path).samples, [], max_pixels=10**8, show_progress=False)
    }
    assert relaxed["cut.jpg"].reason == "corrupt_image"
    assert relaxed["ok.jpg"].reason is None and relaxed["ok.jpg"].measured["format"] == "JPEG"
    assert relaxed["sub/ok.png"].reason == "duplicate_name" and relaxed["sub/ok.png"].duplicate_of == "ok.jpg"


def test_missing_and_empty_captions(tmp_path: Path) -> None:
    from data_prep.sources import Sample

    path = picture(tmp_path / "a.png")
    assert check_sample(Sample("a.png", path, None), [], max_pixels=10**8).reason == "missing_caption"
    assert check_sample(Sample("a.png", path, " \n"), [], max_pixels=10**8).reason == "empty_caption"


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("a cat", "kst, a cat"),
        ("kst, a cat", "kst, a cat"),
        ("a cat in KST style", "a cat in KST style"),
        ("a kstory cat", "kst, a kstory cat"),
    ],
)
def test_trigger_word(caption: str, expected: str) -> None:
    assert with_trigger(caption, "kst") == expected


def test_unknown_op_and_missing_dependency_are_refused_before_running(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("process:\n  - no_such_filter:\n      min_len: 1\n", encoding="utf-8")
    with pytest.raises(KstoryError, match="unknown Data-Juicer op 'no_such_filter'"):
        load_recipe(recipe)
    recipe.write_text("process:\n  - image_shape_filter:\n      min_width: abc\n      min_hieght: 512\n", encoding="utf-8")
    with pytest.raises(KstoryError) as wrong:
        load_recipe(recipe)
    message = str(wrong.value)
    assert "'min_width' expects type 'int'" in message and "'min_hieght'" in message and "min_height" in message
    assert str(recipe) in message
    import data_prep.recipe as recipe_module

    real_find_spec = recipe_module.importlib.util.find_spec
    monkeypatch.setattr(
        recipe_module.importlib.util, "find_spec", lambda name: None if name == "selectolax" else real_find_spec(name)
    )
    with pytest.raises(KstoryError, match=r"selectolax \(for clean_html_mapper\)"):
        load_recipe(None)


def test_data_juicer_may_not_install_packages_mid_run() -> None:
    from data_juicer.utils.lazy_loader import LazyLoader

    missing = LazyLoader("kstory_test_no_such_module")
    with no_auto_install(), pytest.raises(KstoryError, match="kstory_test_no_such_module"):
        missing.anything  # noqa: B018


def test_out_folder_rules(tmp_path: Path) -> None:
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(KstoryError, match="not empty"):
        check_out(other, overwrite=True)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", overwrite=False)
    dataset = tmp_path / "data"
    picture(dataset / "a.png")
    with pytest.raises(KstoryError, match="inside the input folder"):
        prep(dataset, dataset / "prepared", show_progress=False)
    assert sorted(p.name for p in dataset.iterdir()) == ["a.png"]


def test_synthetic_set_is_deterministic(tmp_path: Path) -> None:
    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*")
            if p.is_file()
        }

    first = make_style_dataset(tmp_path / "a", n=3, seed=7)
    second = make_style_dataset(tmp_path / "b", n=3, seed=7)
    assert digest(first) == digest(second)
    assert digest(make_style_dataset(tmp_path / "c", n=3, seed=8)) != digest(first)
    with pytest.raises(KstoryError, match="not empty"):
        make_style_dataset(first)
