"""VeRi-776 converter on generated trees: VeRi/image_{train,query,test}/ with the name_*.txt lists."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from converter_trees import write
from converter_trees_more import VERI_GALLERY, VERI_QUERY, VERI_TRAIN, read_written_csv, write_veri_tree
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SEQUENCE_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.veri776 import PUBLISHED_COUNTS, convert_veri776, main, parse_veri_name

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = {"train images": 4, "train identities": 2, "query images": 2, "gallery images": 6, "test identities": 2,
         "cameras": 8}  # fmt: skip


def test_parse_name():
    assert parse_veri_name("0002_c002_00030600_0.jpg") == (2, 2)
    assert parse_veri_name("0776_c020_00012345_3.jpg") == (776, 20)
    for bad, reason in [("0002_c021_00030600_0.jpg", "camera 21"), ("0777_c001_00030600_0.jpg", "outside 1-776"),
                        ("0002_c02_00030600_0.jpg", "VVVV_cCCC"), ("0002_c002_00030600.jpg", "VVVV_cCCC")]:  # fmt: skip
        with pytest.raises(ValueError, match=reason):
            parse_veri_name(bad)


def test_rows_cameras_and_sequence(tmp_path):
    conversion = convert_veri776(write_veri_tree(tmp_path))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "camera", "sequence"]
    train = df[df[SPLIT_COLUMN] == "train"]
    query = df[df[IS_QUERY_COLUMN] == True]  # noqa: E712 (object column with None)
    gallery = df[df[IS_GALLERY_COLUMN] == True]  # noqa: E712
    assert sorted(train[PATHS_COLUMN]) == [f"VeRi/image_train/{n}" for n in sorted(VERI_TRAIN)]
    assert sorted(query[PATHS_COLUMN]) == [f"VeRi/image_query/{n}" for n in sorted(VERI_QUERY)]
    assert sorted(gallery[PATHS_COLUMN]) == [f"VeRi/image_test/{n}" for n in sorted(VERI_GALLERY)]
    assert set(query[IS_GALLERY_COLUMN]) == {False} and set(gallery[IS_QUERY_COLUMN]) == {False}
    assert sorted(set(train[LABELS_COLUMN])) == [1, 3] and sorted(set(query[LABELS_COLUMN])) == [2, 5]  # no offset
    assert sorted(df["camera"].unique()) == [1, 2, 3, 7, 12, 14, 15, 20]
    assert (df[SEQUENCE_COLUMN] == df[LABELS_COLUMN].astype(str) + "_c" + df["camera"].astype(str)).all()
    report = conversion.report
    assert "2 query image(s) also in image_test/: left out of their ranking by `sequence`" in report.notes
    assert "not used: camera_ID.txt, gt_index.txt, jk_index.txt, test_track.txt, train_label.xml" in report.notes
    assert "cameras: expected 20, found 8" in report.warnings[0]


def test_strict_counts(tmp_path):
    root = write_veri_tree(tmp_path)
    with pytest.raises(ConversionError, match="train identities: expected 576, found 2"):
        convert_veri776(root, strict=True)
    assert convert_veri776(root, strict=True, expected_counts=SMALL).report.warnings == []
    assert PUBLISHED_COUNTS["train identities"] + PUBLISHED_COUNTS["test identities"] == 776


def test_malformed_name_is_named(tmp_path):
    root = write_veri_tree(tmp_path)
    write(root / "VeRi" / "image_test" / "0005_c21_00079100_0.jpg", b"")
    message = r"^VeRi/image_test/0005_c21_00079100_0\.jpg: name does not follow VVVV_cCCC_FFFFFFFF_N\.jpg"
    with pytest.raises(ConversionError, match=message):
        convert_veri776(root)
    report = convert_veri776(root, skip_bad=True).report
    assert report.skipped["malformed file names skipped (--skip-bad)"] == ["VeRi/image_test/0005_c21_00079100_0.jpg"]
    assert len(report.warnings) == 1  # the counts only: the skipped file is not held against name_test.txt


def test_name_lists_that_disagree_are_a_warning(tmp_path):
    root = write_veri_tree(tmp_path)
    (root / "VeRi" / "name_query.txt").write_text("0002_c002_00030600_0.jpg\n0009_c001_00000001_0.jpg\n")
    warnings = convert_veri776(root, expected_counts=SMALL).report.warnings
    assert warnings == [
        "image_query/ and VeRi/name_query.txt disagree: 1 listed image(s) not in the folder (0009_c001_00000001_0.jpg),"
        " 1 image(s) not listed (0005_c014_00078990_1.jpg)"
    ]
    without_lists = write_veri_tree(tmp_path / "b", name_lists=False)
    assert convert_veri776(without_lists, expected_counts=SMALL).report.warnings == []


def test_a_vehicle_in_train_and_test_is_an_error(tmp_path):
    root = write_veri_tree(tmp_path, train=VERI_TRAIN + ["0005_c001_00000001_0.jpg"])
    with pytest.raises(ConversionError, match=r"vehicle id\(s\) in both the train and the test images: 5"):
        convert_veri776(root)


def test_cli_output_passes_the_contract_and_oml_leaves_the_query_copy_out(tmp_path, capsys):
    root = write_veri_tree(tmp_path)
    assert main([str(root)]) == 0
    assert re.search(r"validation query +2 +2\n", capsys.readouterr().out)
    df = read_written_csv(root)
    from oml.datasets.images import get_retrieval_images_datasets
    from oml.retrieval import RetrievalResults

    _, valid = get_retrieval_images_datasets(root, None, None, dataframe_name="dataset.csv", verbose=False)
    val = df[df[SPLIT_COLUMN] == "validation"].reset_index(drop=True)
    query = val[val[IS_QUERY_COLUMN] == True].reset_index(drop=True)  # noqa: E712
    gallery = val[val[IS_GALLERY_COLUMN] == True].reset_index(drop=True)  # noqa: E712
    torch.manual_seed(0)
    results = RetrievalResults.from_embeddings(torch.randn(len(val), 8), valid, n_items=len(gallery))
    for q, row in query.iterrows():
        copy = gallery.index[gallery[PATHS_COLUMN].str.endswith(row[PATHS_COLUMN].rsplit("/", 1)[-1])]
        assert len(copy) == 1 and copy[0] not in results.retrieved_ids[q].tolist()
        same_camera = (gallery[LABELS_COLUMN] == row[LABELS_COLUMN]) & (gallery["camera"] == row["camera"])
        expected = gallery.index[(gallery[LABELS_COLUMN] == row[LABELS_COLUMN]) & ~same_camera]
        assert sorted(results.gt_ids[q].tolist()) == sorted(expected)


def test_runs_as_a_script(tmp_path):
    root = write_veri_tree(tmp_path / "v")
    done = subprocess.run(
        [sys.executable, "converters/veri776.py", str(root), "--strict"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1 and "error: counts differ from the published VeRi-776 ones" in done.stderr
    assert not (root / "dataset.csv").exists()
