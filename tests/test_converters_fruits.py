"""Fruits / ImageFolder converter on generated train/validation/test trees."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from converter_trees import FRUIT_CLASSES, copy_file, jpeg_bytes, png_bytes, write, write_fruits_tree
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError, inspect_image
from converters.fruits import BAD_IMAGE_REASON, convert_fruits, main

LABEL_OF = {name: i for i, name in enumerate(sorted(FRUIT_CLASSES))}


def part(df: pd.DataFrame, split: str, role: str | None = None) -> pd.DataFrame:
    rows = df[df[SPLIT_COLUMN] == split]
    return rows if role is None else rows[rows[role] == True]  # noqa: E712


def expected_paths(folder: str, classes, count: int) -> list[str]:
    return sorted(f"{folder}/{c}/Image_{2 * k + 1}.jpg" for c in classes for k in range(count))


def test_closed_protocol_queries_against_the_train_images(tmp_path):
    conversion = convert_fruits(write_fruits_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "class_name"]
    train = part(df, "train")
    query, gallery = part(df, "validation", IS_QUERY_COLUMN), part(df, "validation", IS_GALLERY_COLUMN)
    assert sorted(train[PATHS_COLUMN]) == expected_paths("train", FRUIT_CLASSES, 3)
    assert sorted(query[PATHS_COLUMN]) == expected_paths("validation", FRUIT_CLASSES, 2)
    assert sorted(gallery[PATHS_COLUMN]) == sorted(train[PATHS_COLUMN])  # the gallery is the train images
    assert len(df) == 18 + 12 + 18
    assert set(query[IS_GALLERY_COLUMN]) == {False} and set(gallery[IS_QUERY_COLUMN]) == {False}
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    # one label map (sorted names, misspellings and spaces as they are) for every split
    assert (df[LABELS_COLUMN] == df["class_name"].map(LABEL_OF)).all()
    assert LABEL_OF == {"apple": 0, "bell pepper": 1, "jalepeno": 2, "raddish": 3, "soy beans": 4, "watermelon": 5}
    label_map = "label map: 0=apple, 1=bell pepper, 2=jalepeno, 3=raddish, 4=soy beans, 5=watermelon"
    assert label_map in conversion.report.notes
    assert "not read: test/" in conversion.report.notes
    assert conversion.report.warnings == [] and not conversion.report.skipped


def test_query_from_test_folder(tmp_path):
    df = convert_fruits(write_fruits_tree(tmp_path), query="test").df
    assert sorted(part(df, "validation", IS_QUERY_COLUMN)[PATHS_COLUMN]) == expected_paths("test", FRUIT_CLASSES, 2)


def test_open_protocol_holds_out_half_the_classes(tmp_path):
    conversion = convert_fruits(write_fruits_tree(tmp_path), protocol="open")
    df = conversion.df
    train, val = part(df, "train"), part(df, "validation")
    assert set(train["class_name"]) == {"apple", "bell pepper", "jalepeno"}  # labels 0-2
    assert set(val[LABELS_COLUMN]) == {3, 4, 5}
    # the images of train/ and validation/ are pooled per class: 3 + 2 per class
    assert len(train) == 15 and len(val) == 15
    assert sorted(val[PATHS_COLUMN]) == sorted(
        expected_paths("train", FRUIT_CLASSES[3:], 3) + expected_paths("validation", FRUIT_CLASSES[3:], 2)
    )
    assert set(val[IS_QUERY_COLUMN]) == {True} and set(val[IS_GALLERY_COLUMN]) == {True}
    assert "open protocol: labels 0-2 train, 3-5 validation" in conversion.report.notes


def test_odd_but_valid_images_are_accepted_and_other_files_ignored(tmp_path):
    root = write_fruits_tree(tmp_path)
    write(root / "train" / "apple" / "Image_20.jpg", png_bytes(mode="RGBA", seed=91))  # PNG bytes, .jpg name
    write(root / "train" / "apple" / "Image_21.JPG", jpeg_bytes(mode="L", seed=92))  # grayscale, upper case
    write(root / "train" / "raddish" / "more" / "Image_22.png", png_bytes(mode="RGBA", seed=93))  # nested
    write(root / "train" / "raddish" / "Image_23.jpeg", jpeg_bytes(seed=94))
    write(root / "train" / "apple" / "Thumbs.db", b"\x00")
    write(root / "validation" / ".DS_Store", b"\x00")
    write(root / "validation" / "apple" / "notes.txt", b"scraped from the web")
    conversion = convert_fruits(root)
    train = part(conversion.df, "train")
    assert len(train) == 18 + 4
    assert {"train/apple/Image_20.jpg", "train/apple/Image_21.JPG", "train/raddish/more/Image_22.png"} <= set(
        train[PATHS_COLUMN]
    )
    assert train.set_index(PATHS_COLUMN).loc["train/raddish/more/Image_22.png", LABELS_COLUMN] == 3
    report = conversion.report
    assert report.skipped["non-image files ignored"] == ["train/apple/Thumbs.db", "validation/apple/notes.txt"]
    assert report.skipped["hidden files and folders ignored"] == ["validation/.DS_Store"]
    assert "accepted non-RGB images (OML converts them to RGB): 1 grayscale, 2 RGBA" in report.notes
    mislabelled = "1 file(s) whose content differs from the extension, accepted: train/apple/Image_20.jpg (PNG)"
    assert mislabelled in report.notes
    # both of OML's readers turn every listed file into an RGB array
    from oml.utils.images.images import imread_cv2, imread_pillow

    for path in conversion.df[PATHS_COLUMN]:
        assert imread_cv2(root / path).shape[2] == 3 and np.asarray(imread_pillow(root / path)).shape[2] == 3


def test_corrupt_and_empty_images_are_listed_and_skipped_or_fatal_with_strict(tmp_path):
    root = write_fruits_tree(tmp_path)
    good = jpeg_bytes(64, 48, seed=99)
    write(root / "train" / "jalepeno" / "Image_30.jpg", good[: len(good) // 2])  # truncated download
    write(root / "validation" / "apple" / "Image_31.jpg", b"")
    write(root / "validation" / "apple" / "Image_32.png", b"not an image at all")
    conversion = convert_fruits(root)
    skipped = conversion.report.skipped[BAD_IMAGE_REASON]
    assert [s.split(" ")[0] for s in skipped] == [
        "train/jalepeno/Image_30.jpg",
        "validation/apple/Image_31.jpg",
        "validation/apple/Image_32.png",
    ]
    assert "image file is truncated" in skipped[0] and "(empty file)" in skipped[1]
    assert len(conversion.df) == 48 and not conversion.df[PATHS_COLUMN].str.contains("Image_3[012]").any()
    with pytest.raises(ConversionError, match=r"3 image\(s\) cannot be used: train/jalepeno/Image_30\.jpg"):
        convert_fruits(root, strict=True)


def test_inspect_image_reads_size_mode_and_hash(tmp_path):
    path = write(tmp_path / "a.jpg", jpeg_bytes(40, 30, mode="L"))
    info = inspect_image(path)
    assert (info.width, info.height, info.mode, info.format, info.extension_matches) == (40, 30, "L", "JPEG", True)
    import hashlib

    # the hash of the file's bytes, computed here rather than by a second call of the function under test
    assert info.sha1 == hashlib.sha1(path.read_bytes()).hexdigest()
    assert inspect_image(copy_file(path, tmp_path / "b.jpeg")).sha1 == hashlib.sha1(path.read_bytes()).hexdigest()


def test_duplicates_across_and_within_folders_are_reported(tmp_path):
    root = write_fruits_tree(tmp_path)
    copy_file(root / "train" / "apple" / "Image_1.jpg", root / "validation" / "apple" / "Image_10.jpg")
    copy_file(root / "train" / "apple" / "Image_1.jpg", root / "train" / "apple" / "Image_11.jpg")
    copy_file(root / "validation" / "raddish" / "Image_1.jpg", root / "validation" / "raddish" / "Image_12.jpg")
    report = convert_fruits(root).report
    assert len(report.warnings) == 1
    assert report.warnings[0].startswith("1 group(s) of byte-identical images span more than one folder (3 files)")
    assert "train/apple/Image_1.jpg = train/apple/Image_11.jpg = validation/apple/Image_10.jpg" in report.warnings[0]
    within = [n for n in report.notes if "inside one folder" in n]
    assert within == [
        "1 group(s) of byte-identical images inside one folder (2 files), "
        "e.g. validation/raddish/Image_1.jpg = validation/raddish/Image_12.jpg"
    ]


def test_missing_query_folder(tmp_path):
    root = write_fruits_tree(tmp_path)
    for path in sorted((root / "validation").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "validation").rmdir()
    with pytest.raises(ConversionError, match=r"missing folder\(s\) validation/"):
        convert_fruits(root)
    assert len(part(convert_fruits(root, query="test").df, "validation", IS_QUERY_COLUMN)) == 12


def test_image_outside_a_class_folder_is_an_error(tmp_path):
    root = write_fruits_tree(tmp_path)
    write(root / "train" / "Image_1.jpg", jpeg_bytes(seed=50))
    with pytest.raises(ConversionError, match=r"directly in train/ have no class folder: train/Image_1\.jpg"):
        convert_fruits(root)


def test_class_sets_that_differ(tmp_path):
    root = write_fruits_tree(tmp_path)
    write(root / "validation" / "kiwi" / "Image_1.jpg", jpeg_bytes(seed=60))
    with pytest.raises(ConversionError, match=r"in validation/ without a train/ folder.*: kiwi"):
        convert_fruits(root)
    # open protocol: kiwi gets the label after apple in the one shared map; train/ and test/ lack it
    conversion = convert_fruits(root, protocol="open")
    df = conversion.df
    assert df.set_index(PATHS_COLUMN).loc["validation/kiwi/Image_1.jpg", LABELS_COLUMN] == 3
    assert conversion.report.warnings == [
        "train/ lacks class folder(s) present elsewhere: kiwi",
        "test/ lacks class folder(s) present elsewhere: kiwi",
    ]
    with pytest.raises(ConversionError, match="train/ lacks class folder"):
        convert_fruits(root, protocol="open", strict=True)


def test_cli_writes_the_csv_and_prints_the_summary(tmp_path, capsys):
    root = write_fruits_tree(tmp_path / "fruits")
    out = tmp_path / "elsewhere" / "fruits.csv"
    assert main([str(root), "--out", str(out), "--protocol", "closed", "--query", "test"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"train +- +18 +6\n", printed) and re.search(r"validation query +12 +6\n", printed)
    assert f"wrote {out} (dataset_root = {root})" in printed
    written = pd.read_csv(out)
    assert len(written) == 48 and written[PATHS_COLUMN].map(lambda p: (root / p).is_file()).all()
    assert not (root / "dataset.csv").exists()
