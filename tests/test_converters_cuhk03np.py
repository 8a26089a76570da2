"""CUHK03-NP converter on generated trees: cuhk03-np/{labeled,detected}/ with Market-like folders of PNGs."""
from __future__ import annotations

import re

import pytest
from converter_trees import write
from converter_trees_more import CUHK_GALLERY, CUHK_QUERY, CUHK_TRAIN, read_written_csv, write_cuhk03np_tree
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SEQUENCE_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.cuhk03np import PUBLISHED_COUNTS, convert_cuhk03np, main, parse_cuhk03np_name

SMALL = {"train images": 5, "train identities": 2, "query images": 4, "gallery images": 5, "test identities": 2,
         "cameras": 2}  # fmt: skip


def test_parse_name():
    assert parse_cuhk03np_name("0001_c1_5.png") == (1, 1)
    assert parse_cuhk03np_name("1467_c2_10.png") == (1467, 2)
    for bad, reason in [("0001_c3_1.png", "camera 3 is not 1 or 2"), ("0001_c1.png", "PPPP_cC_N.png"),
                        ("1_c1_1.png", "PPPP_cC_N.png")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse_cuhk03np_name(bad)


@pytest.mark.parametrize("subset", ["labeled", "detected"])
def test_subset_rows_labels_and_cameras(tmp_path, subset):
    conversion = convert_cuhk03np(write_cuhk03np_tree(tmp_path), subset=subset)
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "camera", "sequence"]
    train = df[df[SPLIT_COLUMN] == "train"]
    query = df[df[IS_QUERY_COLUMN] == True]  # noqa: E712 (object column with None)
    gallery = df[df[IS_GALLERY_COLUMN] == True]  # noqa: E712
    prefix = f"cuhk03-np/{subset}/"
    assert sorted(train[PATHS_COLUMN]) == [f"{prefix}bounding_box_train/{n}" for n in sorted(CUHK_TRAIN)]
    assert sorted(query[PATHS_COLUMN]) == [f"{prefix}query/{n}" for n in sorted(CUHK_QUERY)]
    assert len(gallery) == len(CUHK_GALLERY) + (subset == "detected")
    assert sorted(set(train[LABELS_COLUMN])) == [1, 3]
    assert sorted(set(query[LABELS_COLUMN])) == [10_002, 10_005]  # test labels offset
    assert set(df["camera"]) == {1, 2}
    by_path = df.set_index(PATHS_COLUMN)
    assert by_path.loc[f"{prefix}query/0005_c2_2.png", SEQUENCE_COLUMN] == "10005_c2"
    assert by_path.loc[f"{prefix}bounding_box_train/0003_c2_4.png", SEQUENCE_COLUMN] == "3_c2"
    read = f"read {prefix}bounding_box_train/, {prefix}query/, {prefix}bounding_box_test/"
    assert read + "; test labels are person ids + 10,000" in conversion.report.notes
    expected_gallery = PUBLISHED_COUNTS[subset]["gallery images"]
    assert f"gallery images: expected {expected_gallery:,}, found {len(gallery)}" in conversion.report.warnings[0]


def test_root_may_be_the_release_folder_or_the_subset(tmp_path):
    write_cuhk03np_tree(tmp_path)
    paths = convert_cuhk03np(tmp_path).df[PATHS_COLUMN]
    from_release = convert_cuhk03np(tmp_path / "cuhk03-np").df[PATHS_COLUMN]
    from_subset = convert_cuhk03np(tmp_path / "cuhk03-np" / "labeled").df[PATHS_COLUMN]
    assert from_release.tolist() == paths.str.removeprefix("cuhk03-np/").tolist()
    assert from_subset.tolist() == paths.str.removeprefix("cuhk03-np/labeled/").tolist()
    detected = convert_cuhk03np(tmp_path / "cuhk03-np" / "detected")  # a subset folder converts as itself
    assert detected.report.dataset == "CUHK03-NP (detected)" and len(detected.df) == 15
    with pytest.raises(ConversionError, match="is the labeled subset, not detected; pass its parent"):
        convert_cuhk03np(tmp_path / "cuhk03-np" / "labeled", subset="detected")
    with pytest.raises(ConversionError, match=r"CUHK03-NP: no labeled/ folder holding bounding_box_train/, query/"):
        convert_cuhk03np(tmp_path / "cuhk03-np" / "labeled" / "query")
    for path in (tmp_path / "cuhk03-np" / "detected" / "query").iterdir():
        path.unlink()
    (tmp_path / "cuhk03-np" / "detected" / "query").rmdir()
    with pytest.raises(ConversionError, match=r"CUHK03-NP detected: missing folder\(s\) query/ in .*detected"):
        convert_cuhk03np(tmp_path, subset="detected")


def test_strict_counts(tmp_path):
    root = write_cuhk03np_tree(tmp_path)
    with pytest.raises(ConversionError, match="train images: expected 7,368, found 5"):
        convert_cuhk03np(root, strict=True)
    assert convert_cuhk03np(root, strict=True, expected_counts=SMALL).report.warnings == []
    for counts in PUBLISHED_COUNTS.values():
        assert counts["query images"] == 2 * counts["test identities"]  # one query per person and camera


def test_malformed_name_is_named(tmp_path):
    root = write_cuhk03np_tree(tmp_path)
    write(root / "cuhk03-np" / "labeled" / "query" / "0005_c3_1.png", b"")
    message = r"^cuhk03-np/labeled/query/0005_c3_1\.png: camera 3 is not 1 or 2\. Rename or remove it"
    with pytest.raises(ConversionError, match=message):
        convert_cuhk03np(root)
    conversion = convert_cuhk03np(root, skip_bad=True)
    assert conversion.report.skipped["malformed file names skipped (--skip-bad)"] == [
        "cuhk03-np/labeled/query/0005_c3_1.png"
    ]
    assert len(convert_cuhk03np(root, subset="detected").df) == 15  # the other subset is not read


def test_shared_train_and_test_numbers_are_a_warning(tmp_path):
    root = write_cuhk03np_tree(tmp_path, train=CUHK_TRAIN + ["0002_c1_9.png"])
    warnings = convert_cuhk03np(root).report.warnings
    assert warnings[0].startswith("person id(s) in both the train and the test images: 2 (e.g. cuhk03-np/labeled/")
    assert "kept apart by the test label offset 10,000" in warnings[0]


def test_cli_writes_a_csv_that_passes_the_contract(tmp_path, capsys):
    root = write_cuhk03np_tree(tmp_path)
    assert main([str(root), "--subset", "detected"]) == 0
    assert re.search(r"validation gallery +6 +2\n", capsys.readouterr().out)
    df = read_written_csv(root)
    assert df[PATHS_COLUMN].str.startswith("cuhk03-np/detected/").all()
