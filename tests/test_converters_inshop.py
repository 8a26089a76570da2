"""DeepFashion In-shop converter on generated trees: the release's Img/, Anno/, Eval/ and list-file formats."""
from __future__ import annotations

import re

import pytest
from converter_trees_more import INSHOP_ENTRIES, read_written_csv, write_inshop_tree
from oml.const import CATEGORIES_COLUMN, IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.inshop import PUBLISHED_COUNTS, convert_inshop, main

BOX_COLUMNS = ["x_1", "y_1", "x_2", "y_2"]
SMALL_COUNTS = {
    "images": 12, "items": 5, "train images": 6, "train items": 3, "query images": 3, "query items": 2,
    "gallery images": 3, "gallery items": 2,
}  # fmt: skip


def test_official_lists_become_train_query_and_gallery(tmp_path):
    conversion = convert_inshop(write_inshop_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "category"] + BOX_COLUMNS
    train = df[df[SPLIT_COLUMN] == "train"]
    query = df[df[IS_QUERY_COLUMN] == True]  # noqa: E712 (object column with None)
    gallery = df[df[IS_GALLERY_COLUMN] == True]  # noqa: E712
    expected = {s: sorted("Img/" + e[0] for e in INSHOP_ENTRIES if e[2] == s) for s in ("train", "query", "gallery")}
    assert sorted(train[PATHS_COLUMN]) == expected["train"]
    assert sorted(query[PATHS_COLUMN]) == expected["query"] and set(query[IS_GALLERY_COLUMN]) == {False}
    assert sorted(gallery[PATHS_COLUMN]) == expected["gallery"] and set(gallery[IS_QUERY_COLUMN]) == {False}
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    assert set(train[LABELS_COLUMN]) == {80, 2, 1}
    assert set(query[LABELS_COLUMN]) == set(gallery[LABELS_COLUMN]) == {182, 150}
    # category = gender/clothes type, from the image's folders
    categories = df.groupby(LABELS_COLUMN)[CATEGORIES_COLUMN].agg(set).to_dict()
    assert categories == {1: {"WOMEN/Blouses_Shirts"}, 2: {"WOMEN/Dresses"}, 80: {"MEN/Denim"},
                          150: {"WOMEN/Tees_Tanks"}, 182: {"MEN/Denim"}}  # fmt: skip
    report = conversion.report
    assert "read Eval/list_eval_partition.txt, Anno/list_bbox_inshop.txt; images in Img/img/" in report.notes
    assert "1 train item(s) have a single image (kept)" in report.notes
    assert len(report.warnings) == 1 and "train images: expected 25,882, found 6" in report.warnings[0]


def test_boxes_come_from_their_lines_and_are_clipped_to_the_image(tmp_path):
    conversion = convert_inshop(write_inshop_tree(tmp_path))
    df = conversion.df.set_index(PATHS_COLUMN)
    for name, _, _, _, _, box in INSHOP_ENTRIES:
        expected = box if "Blouses" not in name else (4, 4, 28, 32)  # y_2=40 on a 32-high image
        assert tuple(df.loc["Img/" + name, BOX_COLUMNS]) == expected
    assert "1 box(es) reach beyond their image and were clipped to it" in conversion.report.notes
    no_boxes = convert_inshop(tmp_path, bboxes=False).df
    assert not set(BOX_COLUMNS) & set(no_boxes.columns) and len(no_boxes) == 12


def test_flat_layout(tmp_path):
    release = convert_inshop(write_inshop_tree(tmp_path / "a")).df
    flat = convert_inshop(write_inshop_tree(tmp_path / "b", layout="flat")).df
    assert flat[PATHS_COLUMN].tolist() == release[PATHS_COLUMN].str.removeprefix("Img/").tolist()
    assert flat.drop(columns=PATHS_COLUMN).equals(release.drop(columns=PATHS_COLUMN))


def test_strict_counts(tmp_path):
    root = write_inshop_tree(tmp_path)
    with pytest.raises(ConversionError, match="query items: expected 3,985, found 2"):
        convert_inshop(root, strict=True)
    assert convert_inshop(root, strict=True, expected_counts=SMALL_COUNTS).report.warnings == []
    p = PUBLISHED_COUNTS
    assert p["train images"] + p["query images"] + p["gallery images"] == p["images"] == 52_712


def test_count_line_that_disagrees_is_a_warning(tmp_path):
    root = write_inshop_tree(tmp_path)
    path = root / "Eval" / "list_eval_partition.txt"
    path.write_text(path.read_text().replace("12\n", "13\n", 1))
    report = convert_inshop(root, expected_counts=SMALL_COUNTS).report
    assert report.warnings == ["Eval/list_eval_partition.txt line 1 says 13 entries, the file lists 12"]


def test_malformed_lines_are_named_by_file_and_line(tmp_path):
    entries = list(INSHOP_ENTRIES)
    entries[3] = entries[3][:2] + ("validation",) + entries[3][3:]
    message = r"Eval/list_eval_partition\.txt line 6: evaluation_status must be one of \('train', 'query', 'gallery'\)"
    with pytest.raises(ConversionError, match=message):
        convert_inshop(write_inshop_tree(tmp_path / "a", entries=entries))
    entries = list(INSHOP_ENTRIES)
    entries[8] = entries[8][:5] + ((5, 9, 5, 20),)  # x_1 == x_2
    with pytest.raises(ConversionError, match=r"Anno/list_bbox_inshop\.txt line 11: box x_1=5, y_1=9, x_2=5, y_2=20"):
        convert_inshop(write_inshop_tree(tmp_path / "b", entries=entries))
    convert_inshop(tmp_path / "b", bboxes=False)  # the partition alone is fine
    entries = list(INSHOP_ENTRIES)
    entries[0] = (entries[0][0], "id_00000081") + entries[0][2:]  # the folder says id_00000080
    message = r"line 3: img/MEN/Denim/id_00000080/01_1_front\.jpg lies in id_00000080/ but is listed as id_00000081"
    with pytest.raises(ConversionError, match=message):
        convert_inshop(write_inshop_tree(tmp_path / "c", entries=entries))


def test_box_outside_its_image_and_missing_box_line(tmp_path):
    entries = list(INSHOP_ENTRIES)
    entries[2] = entries[2][:5] + ((40, 0, 50, 10),)  # starts right of the 32-wide image
    message = r"Anno/list_bbox_inshop\.txt line 5: box x_1=40, y_1=0, x_2=50, y_2=10 lies outside the 32x32 image"
    with pytest.raises(ConversionError, match=message):
        convert_inshop(write_inshop_tree(tmp_path / "a", entries=entries))
    root = write_inshop_tree(tmp_path / "b")
    path = root / "Anno" / "list_bbox_inshop.txt"
    path.write_text("\n".join(line for line in path.read_text().splitlines() if "03_2_side" not in line))
    with pytest.raises(ConversionError, match=r"1 image\(s\) have no line in list_bbox_inshop\.txt: img/WOMEN/Tees"):
        convert_inshop(root)


def test_items_must_not_be_in_train_and_test(tmp_path):
    entries = list(INSHOP_ENTRIES)
    entries[1] = ("img/MEN/Denim/id_00000182/01_7_additional.jpg", "id_00000182", "train") + entries[1][3:]
    with pytest.raises(ConversionError, match=r"item\(s\) both in train and in query/gallery: 182"):
        convert_inshop(write_inshop_tree(tmp_path, entries=entries))


def test_cli_writes_a_csv_that_passes_the_contract(tmp_path, capsys):
    root = write_inshop_tree(tmp_path)
    assert main([str(root)]) == 0
    assert re.search(r"validation gallery +3 +2\n", capsys.readouterr().out)
    df = read_written_csv(root)
    assert len(df) == 12 and df[BOX_COLUMNS].notna().all().all()
    assert main([str(root), "--no-bboxes", "--out", str(root / "plain.csv")]) == 0
    assert "x_1" not in read_written_csv(root, "plain.csv").columns
