"""Fast checks of prep's input handling, pre-checks and output safety (no Data-Juicer run)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

import kstory  # noqa: F401  (installs the torchvision fix before Data-Juicer imports it)
from kstory.prep import prep
from kstory.prep.layout import check_out, with_trigger
from kstory.prep.recipe import load_recipe, no_auto_install
from kstory.prep.sources import is_modelscope_id, scan_folder
from kstory.prep.synthetic import make_style_dataset
from kstory.prep.validate import check_sample, check_samples
from kstory.core.errors import KstoryError


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
    from kstory.prep.sources import Sample

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
    import kstory.prep.recipe as recipe_module
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


def test_paths_outside_the_dataset_are_dropped_unread(tmp_path: Path) -> None:
    """``../``, absolute paths and symlinks that lead out are dropped, even when they name a good picture."""
    dataset = tmp_path / "data"
    outside = picture(tmp_path / "elsewhere" / "secret.png")
    picture(dataset / "a.png")
    picture(dataset / "sub" / "b.png")
    (dataset / "out_link.png").symlink_to(outside)
    (dataset / "in_link.png").symlink_to(dataset / "sub" / "b.png")
    (dataset / "out_dir").symlink_to(outside.parent, target_is_directory=True)
    rows = [
        "a.png,inside",
        "../elsewhere/secret.png,parent",
        f"{outside},absolute",
        "out_link.png,a symlink out",
        "out_dir/secret.png,through a linked folder",
        "sub/../sub/b.png,inside after all",
        "in_link.png,a symlink that stays inside",
    ]
    (dataset / "metadata.csv").write_text("file_name,text\n" + "\n".join(rows) + "\n", encoding="utf-8")
    checks = check_samples(scan_folder(dataset).samples, [], max_pixels=10**8, show_progress=False)
    reasons = {check.sample.id: check.reason for check in checks}
    assert reasons == {
        "a.png": None,
        "../elsewhere/secret.png": "path_outside_dataset",
        outside.as_posix(): "path_outside_dataset",
        "out_link.png": "path_outside_dataset",
        "out_dir/secret.png": "path_outside_dataset",
        "sub/../sub/b.png": None,
        "in_link.png": None,
        "sub/b.png": "missing_caption",  # not listed under its own name
    }
    dropped = next(check for check in checks if check.sample.id == "out_link.png")
    assert dropped.measured == {"path": str(dataset / "out_link.png")}  # no header was read
    assert "not read" in dropped.detail


def test_sidecar_symlinks_out_of_the_dataset_are_not_read(tmp_path: Path) -> None:
    dataset = tmp_path / "data"
    outside = picture(tmp_path / "elsewhere" / "secret.png")
    (tmp_path / "elsewhere" / "secret.txt").write_text("private words", encoding="utf-8")
    picture(dataset / "a.png")
    (dataset / "a.txt").write_text("a cat", encoding="utf-8")
    (dataset / "link.png").symlink_to(outside)
    (dataset / "link.txt").write_text("a linked picture", encoding="utf-8")
    picture(dataset / "c.png")
    (dataset / "c.txt").symlink_to(tmp_path / "elsewhere" / "secret.txt")
    samples = {sample.id: sample for sample in scan_folder(dataset).samples}
    assert {name: sample.outside_dataset for name, sample in samples.items()} == {
        "a.png": False,
        "c.png": True,
        "link.png": True,
    }
    assert samples["c.png"].caption is None  # the caption file outside was never read
    checks = check_samples(list(samples.values()), [], max_pixels=10**8, show_progress=False)
    assert [check.reason for check in checks] == [None, "path_outside_dataset", "path_outside_dataset"]


def write_csv(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metadata.csv").write_text(text, encoding="utf-8")
    return folder


def test_unterminated_quote_names_metadata_csv_and_the_line(tmp_path: Path) -> None:
    folder = write_csv(tmp_path, 'file_name,text\na.png,a cat\nb.png,"a dog\nc.png,a fox\nd.png,a frog\n')
    with pytest.raises(KstoryError) as error:
        scan_folder(folder)
    assert error.value.path == folder / "metadata.csv"
    assert error.value.message == (
        "line 3: a quoted field opened here is never closed (it runs to the end of the file, line 5)"
    )
    assert 'two quotes ("")' in error.value.fix
    assert str(error.value).startswith(f"{folder / 'metadata.csv'}: line 3:")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file_name,text\na.png,a cat\nb.png,a dog, running\n", "line 3: has 3 fields, the header 2"),
        ("file_name,text\na.png,a cat\n\nb.png\n", "line 4: has 1 fields, the header 2"),
        ('file_name,text\na.png,"a "quoted" cat"\n', "line 2: is not valid CSV (',' expected after '\"')"),
        (
            'file_name,text\na.png,"a cat\nb.png,a dog\nc.png,a fox"\nd.png,a frog\n',
            "line 2: a quoted field opened here takes in line 3 ('b.png'...) as part of its text",
        ),
    ],
)
def test_csv_syntax_errors_name_the_line(tmp_path: Path, text: str, message: str) -> None:
    for name in ("a.png", "b.png", "c.png", "d.png"):
        picture(tmp_path / name)
    with pytest.raises(KstoryError) as error:
        scan_folder(write_csv(tmp_path, text))
    assert error.value.message == message
    assert error.value.path == tmp_path / "metadata.csv" and error.value.fix


def test_quoted_captions_over_several_lines_are_still_fine(tmp_path: Path) -> None:
    picture(tmp_path / "a.png")
    text = 'file_name,text\na.png,"a cat,\non two lines"\n\nb.png,"a ""quoted"" dog\nsee photo.png, a note"\n'
    assert [(s.id, s.caption) for s in scan_folder(write_csv(tmp_path, text)).samples] == [
        ("a.png", "a cat,\non two lines"),
        ("b.png", 'a "quoted" dog\nsee photo.png, a note'),  # no photo.png in the folder: not a swallowed row
    ]


@pytest.mark.parametrize(
    ("raw", "clean", "changes"),
    [
        ("a cat", "a cat", []),
        ("cafe\u0301 au lait", "caf\u00e9 au lait", ["NFC"]),
        (
            "\ufeff\u202eA cat\u202c on a mat",
            "A cat on a mat",
            ["U+202C POP DIRECTIONAL FORMATTING x1", "U+202E RIGHT-TO-LEFT OVERRIDE x1",
             "U+FEFF ZERO WIDTH NO-BREAK SPACE x1"],
        ),
        ("\u2067a\u2069 \u200ecat\u200f", "a cat", [
            "U+200E LEFT-TO-RIGHT MARK x1", "U+200F RIGHT-TO-LEFT MARK x1",
            "U+2067 RIGHT-TO-LEFT ISOLATE x1", "U+2069 POP DIRECTIONAL ISOLATE x1",
        ]),
        ("a\x00 cat\x07\x07\x9b", "a cat", [
            "U+0000 CONTROL CHARACTER x1", "U+0007 CONTROL CHARACTER x2", "U+009B CONTROL CHARACTER x1",
        ]),
        ("a\tcat\non a mat", "a\tcat\non a mat", []),  # whitespace: the recipe's mapper makes it spaces
        ("\U0001f469\u200d\U0001f3a8 paints", "\U0001f469\u200d\U0001f3a8 paints", []),  # the joiner is visible
    ],
)
def test_captions_are_normalised_and_the_changes_listed(raw: str, clean: str, changes: list[str]) -> None:
    from kstory.prep.captions import normalise_caption

    assert normalise_caption(raw) == (clean, changes)


def test_a_caption_of_invisible_characters_is_empty(tmp_path: Path) -> None:
    from kstory.prep.sources import Sample

    path = picture(tmp_path / "a.png")
    check = check_sample(Sample("a.png", path, "\u202e\ufeff\u200f"), [], max_pixels=10**8)
    assert check.reason == "empty_caption"
    assert check.detail == "the caption is empty once invisible characters are removed"
    assert check.measured == {"caption_chars": 0} and len(check.caption_cleaned) == 3
    kept = check_sample(Sample("a.png", path, "\ufeffa cat"), [], max_pixels=10**8)
    assert kept.reason is None and kept.caption == "a cat"
    assert kept.caption_cleaned == ["U+FEFF ZERO WIDTH NO-BREAK SPACE x1"]


def test_a_deep_dataset_picture_is_exported_as_it_is(tmp_path: Path) -> None:
    """A ModelScope dataset's 16-bit picture reaches the pre-check unclamped (it scales and reports it)."""
    import numpy as np

    from kstory.prep.sources import export_picture

    deep = Image.fromarray(np.array([[0, 25700, 65535]], dtype=np.uint16))
    assert export_picture(deep, tmp_path, 3) == "000003.tif"
    with Image.open(tmp_path / "000003.tif") as written:
        assert written.mode == "I;16" and list(np.asarray(written)[0]) == [0, 25700, 65535]
    assert export_picture(Image.new("P", (4, 4)), tmp_path, 4) == "000004.png"
    with Image.open(tmp_path / "000004.png") as written:
        assert written.mode == "RGB"
