"""CUB-200-2011 converter on generated trees: the release's five list files and images/<NNN.Class>/ folders."""
from __future__ import annotations

import re

import pytest
from converter_trees_more import CUB_IMAGES, cub_image_name, read_written_csv, write_cub_tree
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.cub200 import PUBLISHED_COUNTS, convert_cub200, main

BOX_COLUMNS = ["x_1", "y_1", "x_2", "y_2"]


def split_labels(df, split):
    return sorted(df.loc[df[SPLIT_COLUMN] == split, LABELS_COLUMN])


def test_zero_shot_protocol_splits_by_class(tmp_path):
    conversion = convert_cub200(write_cub_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "class_name"] + BOX_COLUMNS
    assert split_labels(df, "train") == [1, 1, 1, 2, 2, 100]  # classes 1-100, whatever train_test_split says
    assert split_labels(df, "validation") == [101, 101, 101, 200, 200]
    val = df[df[SPLIT_COLUMN] == "validation"]
    assert set(val[IS_QUERY_COLUMN]) == {True} and set(val[IS_GALLERY_COLUMN]) == {True}
    train = df[df[SPLIT_COLUMN] == "train"]
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    first = "CUB_200_2011/images/001.Black_footed_Albatross/Black_Footed_Albatross_0001_41.jpg"
    assert df[PATHS_COLUMN].iloc[0] == first and (tmp_path / first).is_file()
    names = df.groupby(LABELS_COLUMN)["class_name"].agg(set).to_dict()
    assert names[1] == {"Black footed Albatross"} and names[100] == {"Brown Pelican"}
    assert names[101] == {"White Pelican"} and names[200] == {"Common Yellowthroat"}
    report = conversion.report
    assert "not used: README, attributes/, parts/" in report.notes
    assert report.warnings[0].startswith("counts differ from the published CUB-200-2011 zero_shot-protocol ones: ")
    assert "train images: expected 5,864, found 6; train classes: expected 100, found 3" in report.warnings[0]


def test_closed_protocol_keeps_the_official_split(tmp_path):
    df = convert_cub200(write_cub_tree(tmp_path), protocol="closed").df
    official = {"train": [], "validation": []}
    for image_id, (class_id, is_training, _) in enumerate(CUB_IMAGES, start=1):
        official["train" if is_training else "validation"].append(cub_image_name(image_id, class_id))
    for split, names in official.items():
        assert df.loc[df[SPLIT_COLUMN] == split, PATHS_COLUMN].tolist() == [f"CUB_200_2011/images/{n}" for n in names]
    assert set(split_labels(df, "train")) & set(split_labels(df, "validation")) == {1, 2, 101, 200}


def test_boxes_are_corners_truncated_and_clipped(tmp_path):
    conversion = convert_cub200(write_cub_tree(tmp_path))
    boxes = [tuple(b) for b in conversion.df.sort_values(PATHS_COLUMN)[BOX_COLUMNS].itertuples(index=False)]
    by_path = dict(zip(sorted(conversion.df[PATHS_COLUMN]), boxes))
    expected = {
        1: (1, 2, 31, 22),
        3: (5, 3, 25, 14),  # 5.5 + 20.2 = 25.7 -> 25, 3.7 + 10.9 = 14.6 -> 14
        6: (10, 5, 40, 25),  # x + width = 40.6 -> 40
        10: (0, 0, 12, 30),
        11: (7, 7, 40, 17),  # x + width = 47: clipped to the 40-wide image
    }
    for image_id, box in expected.items():
        class_id = CUB_IMAGES[image_id - 1][0]
        assert by_path[f"CUB_200_2011/images/{cub_image_name(image_id, class_id)}"] == box
    assert "1 box(es) reach beyond their image and were clipped to it" in conversion.report.notes
    no_boxes = convert_cub200(tmp_path, bboxes=False)
    assert not set(BOX_COLUMNS) & set(no_boxes.df.columns)
    assert "not used: README, attributes/, bounding_boxes.txt, parts/" in no_boxes.report.notes


def test_contents_layout(tmp_path):
    nested = convert_cub200(write_cub_tree(tmp_path / "a")).df
    flat = convert_cub200(write_cub_tree(tmp_path / "b", nested=False)).df
    assert flat[PATHS_COLUMN].tolist() == nested[PATHS_COLUMN].str.removeprefix("CUB_200_2011/").tolist()


@pytest.mark.parametrize("protocol", ["zero_shot", "closed"])
def test_strict_counts(tmp_path, protocol):
    root = write_cub_tree(tmp_path)
    with pytest.raises(ConversionError, match="images: expected 11,788, found 11"):
        convert_cub200(root, protocol=protocol, strict=True)
    small = {"zero_shot": (6, 3, 5, 2), "closed": (7, 5, 4, 4)}[protocol]
    counts = dict(zip(["train images", "train classes", "validation images", "validation classes"], small))
    assert convert_cub200(root, protocol=protocol, strict=True, expected_counts=counts).report.warnings == []
    published = PUBLISHED_COUNTS[protocol]
    assert published["train images"] + published["validation images"] == published["images"] == 11_788


def test_malformed_lines_are_named_by_file_and_line(tmp_path):
    root = write_cub_tree(tmp_path)
    boxes = root / "CUB_200_2011" / "bounding_boxes.txt"
    good = boxes.read_text()
    boxes.write_text(good.replace("4 2.0 2.0 10.0 10.0", "4 2.0 2.0 ten 10.0"))
    with pytest.raises(ConversionError, match=r"^CUB_200_2011/bounding_boxes\.txt line 4: width must be a number"):
        convert_cub200(root)
    assert len(convert_cub200(root, bboxes=False).df) == 11  # the boxes alone were bad
    boxes.write_text(good)
    labels = root / "CUB_200_2011" / "image_class_labels.txt"
    labels.write_text(labels.read_text().replace("7 101\n", "7 102\n"))  # image 7 lies in 101.White_Pelican/
    message = r"images\.txt line 7: 101\.White_Pelican/.* is not in a 102\.<name>/ folder, but .*image_class_labels"
    with pytest.raises(ConversionError, match=message):
        convert_cub200(root)
    labels.write_text(labels.read_text().replace("7 102\n", "7 101\n").replace("9 101\n", ""))
    with pytest.raises(ConversionError, match=r"images\.txt line 9: image_id 9 has no line in image_class_labels\.txt"):
        convert_cub200(root)


def test_split_file_value_and_repeated_id(tmp_path):
    root = write_cub_tree(tmp_path)
    split = root / "CUB_200_2011" / "train_test_split.txt"
    split.write_text(split.read_text().replace("2 0\n", "2 2\n"))
    with pytest.raises(ConversionError, match=r"train_test_split\.txt line 2: is_training_image 2 outside 0\.\.1"):
        convert_cub200(root)
    split.write_text(split.read_text().replace("2 2\n", "2 0\n2 1\n"))
    message = r"train_test_split\.txt line 3: image_id 2 is already listed at .*train_test_split\.txt line 2"
    with pytest.raises(ConversionError, match=message):
        convert_cub200(root)


def test_cli_writes_a_csv_that_passes_the_contract(tmp_path, capsys):
    root = write_cub_tree(tmp_path)
    assert main([str(root), "--protocol", "closed"]) == 0
    assert re.search(r"validation query +4 +4\n", capsys.readouterr().out)
    df = read_written_csv(root)
    assert (df[SPLIT_COLUMN] == "train").sum() == 7 and df[BOX_COLUMNS].notna().all().all()
