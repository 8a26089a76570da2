"""MSMT17 converter on generated V1 and V2 trees: the four list files and the per-person folders."""
from __future__ import annotations

import re

import pytest
import torch
from converter_trees import write
from converter_trees_more import msmt_lines, read_written_csv, write_msmt_tree
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SEQUENCE_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.listfiles import UNLISTED_REASON
from converters.msmt17 import PUBLISHED_COUNTS, VAL_EXCLUDED_REASON, convert_msmt17, main, parse_msmt_name

SMALL_COUNTS = {
    "train images": 6, "train identities": 3, "query images": 3, "gallery images": 5, "test identities": 3,
    "cameras": 10,
}  # fmt: skip


def test_parse_msmt_name():
    assert parse_msmt_name("0000_045_12_0303morning_0006_2.jpg", 0) == 12
    assert parse_msmt_name("3059_001_01_0113noon_0911_0_ex.jpg", 3059) == 1
    for name, pid, reason in [
        ("0000_045_12_0303morning_0006_2.jpg", 7, "is of person 0, the line says 7"),
        ("0000_045_16_0303morning_0006_2.jpg", 0, "camera 16 is outside 1-15"),
        ("0000_12_0303morning.jpg", 0, "does not follow"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_msmt_name(name, pid)


def test_v1_rows_labels_cameras_and_sequence(tmp_path):
    conversion = convert_msmt17(write_msmt_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "camera", "sequence"]
    train = df[df[SPLIT_COLUMN] == "train"]
    query = df[df[IS_QUERY_COLUMN] == True]  # noqa: E712 (object column with None)
    gallery = df[df[IS_GALLERY_COLUMN] == True]  # noqa: E712
    assert len(train) == 6 and len(query) == 3 and len(gallery) == 5  # list_val is trained on by default
    assert train[PATHS_COLUMN].str.startswith("MSMT17_V1/train/").all()
    assert query[PATHS_COLUMN].str.startswith("MSMT17_V1/test/").all()
    # both sets number persons from 0: test labels get their own range
    assert sorted(set(train[LABELS_COLUMN])) == [0, 1, 2]
    assert sorted(set(query[LABELS_COLUMN])) == sorted(set(gallery[LABELS_COLUMN])) == [10_000, 10_001, 10_002]
    assert sorted(query["camera"]) == [3, 12, 15] and set(train["camera"]) == {1, 2, 5, 7, 9}
    assert (df[SEQUENCE_COLUMN] == df[LABELS_COLUMN].astype(str) + "_c" + df["camera"].astype(str)).all()
    first = "MSMT17_V1/train/0000/0000_000_01_0303morning_0000_0.jpg"
    assert df[PATHS_COLUMN].iloc[0] == first and (tmp_path / first).is_file()
    assert any("test labels are person ids + 10,000" in n for n in conversion.report.notes)
    assert "cameras: expected 15, found 10" in conversion.report.warnings[0]


def test_v2_folders_and_exclude_val(tmp_path):
    v1 = convert_msmt17(write_msmt_tree(tmp_path / "a")).df
    v2 = convert_msmt17(write_msmt_tree(tmp_path / "b", version="V2")).df
    renamed = v1[PATHS_COLUMN].str.replace("MSMT17_V1/train/", "MSMT17_V2/mask_train_v2/")
    assert v2[PATHS_COLUMN].tolist() == renamed.str.replace("MSMT17_V1/test/", "MSMT17_V2/mask_test_v2/").tolist()
    conversion = convert_msmt17(tmp_path / "b", exclude_val=True, expected_counts=SMALL_COUNTS)
    train = conversion.df[conversion.df[SPLIT_COLUMN] == "train"]
    assert sorted(set(train[LABELS_COLUMN])) == [0, 1]  # person 2 is only in list_val
    assert len(conversion.report.skipped[VAL_EXCLUDED_REASON]) == 2
    assert conversion.report.warnings == []  # the counts cover list_val whatever the flag


def test_strict_counts(tmp_path):
    root = write_msmt_tree(tmp_path)
    with pytest.raises(ConversionError, match="gallery images: expected 82,161, found 5"):
        convert_msmt17(root, strict=True)
    assert convert_msmt17(root, strict=True, expected_counts=SMALL_COUNTS).report.warnings == []
    assert PUBLISHED_COUNTS["train identities"] + PUBLISHED_COUNTS["test identities"] == 4_101


def test_malformed_line_is_named_by_file_and_line(tmp_path):
    root = write_msmt_tree(tmp_path, extra_lines={"gallery": ["0001/0001_300_02_0303noon_0001_0.jpg"]})
    with pytest.raises(ConversionError, match=r"^MSMT17_V1/list_gallery\.txt line 6: expected 2 fields, found 1"):
        convert_msmt17(root)


def test_person_id_of_the_line_and_the_name_must_agree(tmp_path):
    _, line = msmt_lines([(1, 4, "query")], start=200)[0]
    root = write_msmt_tree(tmp_path, extra_lines={"query": [line.replace(" 1", " 2")]})
    message = r"MSMT17_V1/list_query\.txt line 4: file name '0001_200_04.*' is of person 1, the line says 2\. Fix"
    with pytest.raises(ConversionError, match=message):
        convert_msmt17(root)
    conversion = convert_msmt17(root, skip_bad=True)
    assert conversion.report.skipped["malformed file names skipped (--skip-bad)"] == [
        "MSMT17_V1/list_query.txt line 4: 0001/0001_200_04_0303afternoon_1400_0.jpg"
    ]


def test_missing_repeated_and_unlisted_images(tmp_path):
    root = write_msmt_tree(tmp_path)
    gallery_list = (root / "MSMT17_V1" / "list_gallery.txt").read_text().splitlines()
    (root / "MSMT17_V1" / "list_val.txt").write_text("\n".join(["0002/0002_004_07_0303noon_0028_0.jpg 2"] * 2))
    with pytest.raises(ConversionError, match=r"list_val\.txt line 2: .* is already listed at .*list_val\.txt line 1"):
        convert_msmt17(root)
    (root / "MSMT17_V1" / "list_val.txt").write_text("0002/0002_004_07_0303noon_0028_0.jpg 2\n")
    assert convert_msmt17(root).report.skipped[UNLISTED_REASON] == [
        "MSMT17_V1/train/0002/0002_005_09_0303afternoon_0035_1.jpg"
    ]
    (root / "MSMT17_V1" / "test" / gallery_list[1].split()[0]).unlink()
    with pytest.raises(ConversionError, match=r"1 listed image\(s\) missing: MSMT17_V1/list_gallery\.txt line 2: "):
        convert_msmt17(root)


def test_query_without_a_cross_camera_match(tmp_path):
    _, line = msmt_lines([(2, 10, "query")], start=300)[0]  # person 2's gallery images: cameras 15 and 10
    root = write_msmt_tree(tmp_path)
    gallery = root / "MSMT17_V1" / "list_gallery.txt"
    gallery.write_text("\n".join(x for x in gallery.read_text().splitlines() if "_15_" not in x))
    (root / "MSMT17_V1" / "list_query.txt").write_text((root / "MSMT17_V1" / "list_query.txt").read_text() + line)
    write(root / "MSMT17_V1" / "test" / line.split()[0], b"")
    message = r"1 query image\(s\) have no gallery image .* from another camera.*: MSMT17_V1/test/0002/0002_300_10_"
    with pytest.raises(ConversionError, match=message):
        convert_msmt17(root)
    assert (convert_msmt17(root, skip_bad=True).df[IS_QUERY_COLUMN] == True).sum() == 3  # noqa: E712


def test_cli_output_passes_the_contract_and_oml_masks_same_camera(tmp_path, capsys):
    root = write_msmt_tree(tmp_path)
    assert main([str(root)]) == 0
    assert re.search(r"validation gallery +5 +3\n", capsys.readouterr().out)
    df = read_written_csv(root)
    from oml.datasets.images import get_retrieval_images_datasets
    from oml.retrieval import RetrievalResults

    _, valid = get_retrieval_images_datasets(root, None, None, dataframe_name="dataset.csv", verbose=False)
    val = df[df[SPLIT_COLUMN] == "validation"].reset_index(drop=True)
    gallery = val[val[IS_GALLERY_COLUMN] == True].reset_index(drop=True)  # noqa: E712
    torch.manual_seed(0)
    results = RetrievalResults.from_embeddings(torch.randn(len(val), 8), valid, n_items=len(gallery))
    # query 0 (person 0, camera 3): its camera-3 gallery image is left out, the camera-4 one is the match
    assert [gallery.loc[i, "camera"] for i in results.gt_ids[0].tolist()] == [4]
    assert len(results.retrieved_ids[0]) == len(gallery) - 1
