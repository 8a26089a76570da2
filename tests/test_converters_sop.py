"""Stanford Online Products converter on generated trees with the release's list files and folders."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from converter_trees import write
from converter_trees_more import (
    SOP_TEST_PRODUCTS,
    SOP_TRAIN_PRODUCTS,
    read_written_csv,
    sop_lines,
    write_sop_tree,
)
from oml.const import CATEGORIES_COLUMN, IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.listfiles import UNLISTED_REASON
from converters.sop import PUBLISHED_COUNTS, convert_sop, main

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL_COUNTS = {"train images": 11, "train classes": 4, "test images": 7, "test classes": 3, "super-classes": 4}


def test_rows_protocol_and_categories(tmp_path):
    write_sop_tree(tmp_path / "Stanford_Online_Products")
    conversion = convert_sop(tmp_path)
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "category"]
    train, val = df[df[SPLIT_COLUMN] == "train"], df[df[SPLIT_COLUMN] == "validation"]
    assert len(train) == 11 and len(val) == 7
    assert set(train[LABELS_COLUMN]) == {1, 2, 3, 4} and set(val[LABELS_COLUMN]) == {5, 6, 7}
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    assert set(val[IS_QUERY_COLUMN]) == {True} and set(val[IS_GALLERY_COLUMN]) == {True}  # leave-one-out
    # category = the super-class folder without _final; each class in one category
    by_label = df.groupby(LABELS_COLUMN)[CATEGORIES_COLUMN].agg(set).to_dict()
    assert by_label == {1: {"bicycle"}, 2: {"bicycle"}, 3: {"chair"}, 4: {"mug"}, 5: {"bicycle"}, 6: {"mug"},
                        7: {"toaster"}}  # fmt: skip
    # the archive's folder is found and kept in the paths; upper-case .JPG as released
    first = "Stanford_Online_Products/bicycle_final/111085122871_0.JPG"
    assert df[PATHS_COLUMN].iloc[0] == first and (tmp_path / first).is_file()
    report = conversion.report
    assert report.skipped["non-image files ignored"] == ["Stanford_Online_Products/bicycle_final/Thumbs.db"]
    assert "not used: Ebay_final.txt, Ebay_info.txt, LICENSE, README, bicycle_final.txt" in report.notes
    assert report.warnings == [
        "counts differ from the published SOP ones: train images: expected 59,551, found 11; train classes: "
        "expected 11,318, found 4; test images: expected 60,502, found 7; test classes: expected 11,316, found 3; "
        "super-classes: expected 12, found 4"
    ]


def test_contents_layout_gives_the_same_rows(tmp_path):
    write_sop_tree(tmp_path / "a" / "Stanford_Online_Products")
    nested = convert_sop(tmp_path / "a").df
    flat = convert_sop(write_sop_tree(tmp_path / "b")).df
    assert flat[PATHS_COLUMN].tolist() == nested[PATHS_COLUMN].str.removeprefix("Stanford_Online_Products/").tolist()
    assert flat.drop(columns=PATHS_COLUMN).equals(nested.drop(columns=PATHS_COLUMN))


def test_strict_counts(tmp_path):
    root = write_sop_tree(tmp_path)
    with pytest.raises(ConversionError, match="test classes: expected 11,316, found 3"):
        convert_sop(root, strict=True)
    conversion = convert_sop(root, strict=True, expected_counts=SMALL_COUNTS)
    assert conversion.report.warnings == []
    assert "all published SOP counts match (5 checked)" in conversion.report.notes
    p = PUBLISHED_COUNTS
    assert p["train images"] + p["test images"] == 120_053 and p["train classes"] + p["test classes"] == 22_634


def test_malformed_line_is_named_by_file_and_line(tmp_path):
    test = sop_lines(SOP_TEST_PRODUCTS)
    test[1] = "2 5 1"  # the path is missing; line 3 (the header is line 1)
    with pytest.raises(ConversionError, match=r"^Ebay_test\.txt line 3: expected 4 fields, found 3: '2 5 1'$"):
        convert_sop(write_sop_tree(tmp_path / "a", test_lines=test))
    train = sop_lines(SOP_TRAIN_PRODUCTS)
    train[4] = train[4].replace(" 2 1 ", " two 1 ")
    with pytest.raises(ConversionError, match=r"Ebay_train\.txt line 6: class_id must be an integer, found 'two'"):
        convert_sop(write_sop_tree(tmp_path / "b", train_lines=train))
    with pytest.raises(ConversionError, match=r"Ebay_train\.txt line 1: expected the header 'image_id class_id"):
        convert_sop(write_sop_tree(tmp_path / "c", header="image_id,class_id,super_class_id,path"))


def test_super_class_and_folder_must_agree(tmp_path):
    test = sop_lines(SOP_TEST_PRODUCTS)
    test[0] = test[0].replace(" 5 1 ", " 5 2 ")  # super-class 2 (cabinet) for an image in bicycle_final/
    message = r"Ebay_test\.txt line 2: bicycle_final/ is super_class_id 2 here but 1 at Ebay_train\.txt line 2"
    with pytest.raises(ConversionError, match=message):
        convert_sop(write_sop_tree(tmp_path / "a", test_lines=test))
    test[0] = test[0].replace(" 5 2 bicycle_final/", " 5 8 bicycle_final/")  # mug's id, bicycle's folder
    message = r"Ebay_test\.txt line 2: super_class_id 8 is bicycle_final/ here but mug_final/ at Ebay_train"
    with pytest.raises(ConversionError, match=message):
        convert_sop(write_sop_tree(tmp_path / "b", test_lines=test))


def test_classes_must_not_span_both_files(tmp_path):
    test = sop_lines(SOP_TEST_PRODUCTS) + ["8 4 8 mug_final/1310_9.JPG"]  # train class 4 in the test list
    message = r"class_id\(s\) in both Ebay_train\.txt and Ebay_test\.txt: 4 \(first in the test list at Ebay_test"
    with pytest.raises(ConversionError, match=message):
        convert_sop(write_sop_tree(tmp_path, test_lines=test))


def test_missing_and_unlisted_images(tmp_path):
    root = write_sop_tree(tmp_path)
    write(root / "mug_final" / "999_0.JPG", b"")
    assert convert_sop(root).report.skipped[UNLISTED_REASON] == ["mug_final/999_0.JPG"]
    (root / "chair_final" / "121005413404_1.JPG").unlink()
    message = r"1 listed image\(s\) missing: Ebay_train\.txt line 8: chair_final/121005413404_1\.JPG$"
    with pytest.raises(ConversionError, match=message):
        convert_sop(root)


def test_cli_writes_a_csv_that_passes_the_contract(tmp_path, capsys):
    root = write_sop_tree(tmp_path)
    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"validation query +7 +3\n", printed) and "WARNING: counts differ" in printed
    df = read_written_csv(root)
    assert len(df) == 18 and set(df[CATEGORIES_COLUMN]) == {"bicycle", "chair", "mug", "toaster"}
    (root / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 5 1\n")
    (root / "dataset.csv").unlink()
    assert main([str(root)]) == 1
    assert "error: Ebay_test.txt line 2: expected 4 fields" in capsys.readouterr().err
    assert not list(root.glob("*.csv")) and not list(root.glob(".dataset.csv.*"))


def test_runs_as_a_script(tmp_path):
    root = write_sop_tree(tmp_path / "sop")
    done = subprocess.run(
        [sys.executable, "converters/sop.py", str(root), "--out", str(tmp_path / "sop.csv")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'sop.csv'}" in done.stdout
