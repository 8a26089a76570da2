"""Stanford Cars converter on generated trees: the devkit's .mat structures written with scipy."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import scipy.io
from converter_trees import (
    CAR_FIELDS,
    CARS196_CLASS_NAMES,
    FIRST_TRAIN_ANNOTATION,
    default_car_annotations,
    save_car_annotations,
    write,
    write_cars_tree,
)
from oml.const import CATEGORIES_COLUMN, IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN

from converters.cars196 import PUBLISHED_COUNTS, convert_cars196, main, manufacturer
from converters.common import ConversionError

BOX_COLUMNS = ["x_1", "y_1", "x_2", "y_2"]


def test_the_generated_mat_files_look_like_the_devkit(tmp_path):
    root = write_cars_tree(tmp_path)
    annotations = scipy.io.loadmat(root / "devkit" / "cars_train_annos.mat")["annotations"]
    assert annotations.shape == (1, 199) and annotations.dtype.names == CAR_FIELDS
    first = annotations[0, 0]
    assert [first[f].dtype for f in CAR_FIELDS[:5]] == [np.uint8, np.uint8, np.uint16, np.uint16, np.uint8]
    assert first["fname"][0] == "00001.jpg" and first["class"][0, 0] == 14
    names = scipy.io.loadmat(root / "devkit" / "cars_meta.mat")["class_names"]
    assert names.shape == (1, 196) and names[0, 0][0] == "AM General Hummer SUV 2000"


def test_metric_protocol_splits_by_class(tmp_path):
    conversion = convert_cars196(write_cars_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == [
        "label", "path", "split", "is_query", "is_gallery", "category", "class_name", "x_1", "y_1", "x_2", "y_2"
    ]  # fmt: skip
    train, val = df[df[SPLIT_COLUMN] == "train"], df[df[SPLIT_COLUMN] == "validation"]
    # one train + one test image per class, plus extra train images of classes 1, 2 and 99
    assert len(train) == 98 + 98 + 2 and len(val) == 98 + 98 + 1
    assert set(train[LABELS_COLUMN]) == set(range(1, 99)) and set(val[LABELS_COLUMN]) == set(range(99, 197))
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    assert set(val[IS_QUERY_COLUMN]) == {True} and set(val[IS_GALLERY_COLUMN]) == {True}
    # both original folders are pooled, and identical basenames stay apart through the folder
    assert (train[PATHS_COLUMN].str.startswith("cars_test/")).sum() == 98
    assert {"cars_train/00001.jpg", "cars_test/00001.jpg"} <= set(df[PATHS_COLUMN])
    assert df[PATHS_COLUMN].is_unique
    assert conversion.report.warnings == [
        "counts differ from the published Cars196 metric-protocol ones: "
        "train images: expected 8,054, found 198; validation images: expected 8,131, found 197"
    ]


def test_stanford_protocol_splits_by_folder(tmp_path):
    df = convert_cars196(write_cars_tree(tmp_path), protocol="stanford").df
    train, val = df[df[SPLIT_COLUMN] == "train"], df[df[SPLIT_COLUMN] == "validation"]
    assert len(train) == 199 and len(val) == 196
    assert train[PATHS_COLUMN].str.startswith("cars_train/").all()
    assert val[PATHS_COLUMN].str.startswith("cars_test/").all()
    assert set(train[LABELS_COLUMN]) == set(val[LABELS_COLUMN]) == set(range(1, 197))
    assert set(val[IS_QUERY_COLUMN]) == {True} and set(val[IS_GALLERY_COLUMN]) == {True}


def test_labels_boxes_and_names_come_from_the_right_entries(tmp_path):
    df = convert_cars196(write_cars_tree(tmp_path), protocol="stanford").df.set_index(PATHS_COLUMN)
    fname, class_id, box = FIRST_TRAIN_ANNOTATION
    first = df.loc[f"cars_train/{fname}"]
    assert first[LABELS_COLUMN] == 14 and tuple(first[BOX_COLUMNS]) == box  # the devkit's first entry
    assert first["class_name"] == "Audi TTS Coupe 2012" and first[CATEGORIES_COLUMN] == "Audi"  # class 14 -> index 13
    train, test = default_car_annotations()
    for folder, folder_annotations in (("cars_train", train), ("cars_test", test)):
        for fname, class_id, box in folder_annotations:
            row = df.loc[f"{folder}/{fname}"]
            assert (row[LABELS_COLUMN], tuple(row[BOX_COLUMNS])) == (class_id, box)
            assert row["class_name"] == CARS196_CLASS_NAMES[class_id - 1]
    assert all(df[c].dtype == np.int64 for c in BOX_COLUMNS + [LABELS_COLUMN])


def test_manufacturer_parsing():
    assert manufacturer("AM General Hummer SUV 2000") == "AM General"
    assert manufacturer("Aston Martin Virage Coupe 2012") == "Aston Martin"
    assert manufacturer("Land Rover LR2 SUV 2012") == "Land Rover"
    assert manufacturer("Rolls-Royce Ghost Sedan 2012") == "Rolls-Royce"
    assert manufacturer("Ram C/V Cargo Van Minivan 2012") == "Ram"
    assert manufacturer("smart fortwo Convertible 2012") == "smart"
    makes = Counter(manufacturer(n) for n in CARS196_CLASS_NAMES)
    assert len(makes) == 49
    assert (makes["Chevrolet"], makes["AM General"], makes["HUMMER"], makes["Aston Martin"]) == (22, 1, 2, 4)


def test_category_column_groups_classes_by_make(tmp_path):
    df = convert_cars196(write_cars_tree(tmp_path)).df
    assert df.groupby(LABELS_COLUMN)[CATEGORIES_COLUMN].nunique().max() == 1
    assert df[CATEGORIES_COLUMN].nunique() == 49
    train_makes = set(df.loc[df[SPLIT_COLUMN] == "train", CATEGORIES_COLUMN])
    assert {"AM General", "Aston Martin", "Audi"} <= train_makes and "Land Rover" not in train_makes


@pytest.mark.parametrize("layout", ["torchvision", "kaggle"])
def test_other_layouts_give_the_same_rows(tmp_path, layout):
    original = convert_cars196(write_cars_tree(tmp_path / "original")).df
    other = convert_cars196(write_cars_tree(tmp_path / layout, layout=layout)).df
    prefix = {"torchvision": "stanford_cars/", "kaggle": ""}[layout]
    if layout == "kaggle":  # nested cars_train/cars_train/
        expected_paths = original[PATHS_COLUMN].str.replace(r"^(cars_\w+)/", r"\1/\1/", regex=True)
    else:
        expected_paths = prefix + original[PATHS_COLUMN]
    assert other[PATHS_COLUMN].tolist() == expected_paths.tolist()
    pd.testing.assert_frame_equal(other.drop(columns=PATHS_COLUMN), original.drop(columns=PATHS_COLUMN))
    assert all((tmp_path / layout / p).is_file() for p in other[PATHS_COLUMN])


def test_no_bboxes_drops_the_columns_and_skips_the_box_check(tmp_path):
    root = write_cars_tree(tmp_path)
    train, _ = default_car_annotations()
    train[5] = (train[5][0], train[5][1], (0, 0, 900, 10))  # outside the 64x48 image
    save_car_annotations(root / "devkit" / "cars_train_annos.mat", train)
    with pytest.raises(ConversionError, match="box"):
        convert_cars196(root)
    df = convert_cars196(root, bboxes=False).df
    assert not set(BOX_COLUMNS) & set(df.columns) and len(df) == 395


def test_strict_counts(tmp_path):
    root = write_cars_tree(tmp_path)
    with pytest.raises(ConversionError, match="validation images: expected 8,041, found 196"):
        convert_cars196(root, protocol="stanford", strict=True)
    expected = dict(PUBLISHED_COUNTS["stanford"], **{"train images": 199, "validation images": 196})
    assert convert_cars196(root, protocol="stanford", strict=True, expected_counts=expected).report.warnings == []
    assert PUBLISHED_COUNTS["metric"]["train images"] + PUBLISHED_COUNTS["metric"]["validation images"] == 16_185
    assert PUBLISHED_COUNTS["stanford"]["train images"] + PUBLISHED_COUNTS["stanford"]["validation images"] == 16_185


def test_missing_class_field_names_the_labelled_file(tmp_path):
    root = write_cars_tree(tmp_path)
    _, test = default_car_annotations()
    save_car_annotations(root / "cars_test_annos_withlabels.mat", test, [f for f in CAR_FIELDS if f != "class"])
    with pytest.raises(ConversionError, match=r"cars_test_annos_withlabels\.mat: field\(s\) \['class'\] missing"):
        convert_cars196(root)


def test_only_the_unlabelled_devkit_test_file_is_an_error(tmp_path):
    root = write_cars_tree(tmp_path)
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(ConversionError, match=r"only cars_test_annos\.mat found, which has no class labels"):
        convert_cars196(root)


def test_missing_meta_file(tmp_path):
    root = write_cars_tree(tmp_path)
    (root / "devkit" / "cars_meta.mat").unlink()
    with pytest.raises(ConversionError, match=r"missing cars_meta\.mat \(looked in"):
        convert_cars196(root)


def test_missing_image_folder(tmp_path):
    root = write_cars_tree(tmp_path)
    for path in (root / "cars_test").iterdir():
        path.unlink()
    (root / "cars_test").rmdir()
    with pytest.raises(ConversionError, match=r"missing image folder cars_test/"):
        convert_cars196(root)


def test_box_outside_the_image_is_named(tmp_path):
    root = write_cars_tree(tmp_path)
    train, _ = default_car_annotations()
    train[5] = (train[5][0], train[5][1], (1, 2, 65, 40))  # the image is 64 wide
    save_car_annotations(root / "devkit" / "cars_train_annos.mat", train)
    message = r"cars_train/00006\.jpg: box x_1=1, y_1=2, x_2=65, y_2=40 vs image 64x48"
    with pytest.raises(ConversionError, match=message):
        convert_cars196(root)


def test_empty_box_is_rejected(tmp_path):
    _, test = default_car_annotations()
    test[0] = (test[0][0], test[0][1], (10, 5, 10, 20))
    with pytest.raises(ConversionError, match=r"cars_test/00001\.jpg: box x_1=10"):
        convert_cars196(write_cars_tree(tmp_path, test=test))


def test_annotated_image_missing(tmp_path):
    root = write_cars_tree(tmp_path)
    (root / "cars_test" / "00007.jpg").unlink()
    with pytest.raises(ConversionError, match=r"1 annotated image\(s\) missing: cars_test/00007\.jpg"):
        convert_cars196(root)


def test_folder_named_like_an_annotated_image_counts_as_missing(tmp_path):
    root = write_cars_tree(tmp_path, layout="kaggle")  # images in the nested cars_test/cars_test/
    (root / "cars_test" / "cars_test" / "00007.jpg").unlink()
    (root / "cars_test" / "cars_test" / "00007.jpg").mkdir()
    with pytest.raises(ConversionError, match=r"1 annotated image\(s\) missing: cars_test/cars_test/00007\.jpg$"):
        convert_cars196(root, bboxes=False)


def test_class_out_of_range_and_duplicate_fname(tmp_path):
    train, test = default_car_annotations()
    bad_class = train[:3] + [("00004.jpg", 197, (1, 1, 5, 5))]
    with pytest.raises(ConversionError, match=r"annotations\[3\] \(00004\.jpg\): class 197 outside 1\.\.196"):
        convert_cars196(write_cars_tree(tmp_path / "a", train=bad_class))
    duplicate = train + [train[1]]
    with pytest.raises(ConversionError, match=r"annotations\[199\]: 00002\.jpg is annotated twice"):
        convert_cars196(write_cars_tree(tmp_path / "b", train=duplicate))


def test_extra_files_are_reported_not_used(tmp_path):
    root = write_cars_tree(tmp_path)
    write(root / "cars_train" / "Thumbs.db", b"x")
    write(root / "cars_train" / "09999.jpg", (root / "cars_train" / "00002.jpg").read_bytes())
    report = convert_cars196(root).report
    assert report.skipped["non-image files ignored"] == ["cars_train/Thumbs.db"]
    assert report.skipped["images without an annotation ignored"] == ["cars_train/09999.jpg"]


def test_cli_output_is_loadable_by_oml_with_crops(tmp_path, capsys):
    root = write_cars_tree(tmp_path)
    assert main([str(root), "--protocol", "stanford"]) == 0
    assert re.search(r"validation query +196 +196\n", capsys.readouterr().out)
    from oml.datasets.images import get_retrieval_images_datasets

    train, valid = get_retrieval_images_datasets(root, None, None, dataframe_name="dataset.csv", verbose=False)
    df = pd.read_csv(root / "dataset.csv")
    index = int(np.flatnonzero(df[PATHS_COLUMN] == "cars_train/00001.jpg")[0])  # train rows come first
    image = train[index]["input_tensors"]
    assert tuple(image.shape) == (3, 375 - 116, 569 - 39)  # OML crops to the box
    assert len(valid) == 196
