"""Market-1501 converter on generated trees with the real names and folders."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from converter_trees import (
    MARKET_GALLERY,
    MARKET_QUERY,
    MARKET_TRAIN,
    write,
    write_market_published_counts,
    write_market_tree,
)
from oml.const import IS_GALLERY_COLUMN, IS_QUERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SEQUENCE_COLUMN, SPLIT_COLUMN

from converters.common import ConversionError
from converters.market1501 import JUNK_REASON, PUBLISHED_COUNTS, convert_market1501, main, parse_market_name
from converters.reid import BAD_NAME_REASON, INVALID_QUERY_REASON

REPO_ROOT = Path(__file__).resolve().parent.parent


def rows(df: pd.DataFrame, split: str, role: str | None = None) -> pd.DataFrame:
    part = df[df[SPLIT_COLUMN] == split]
    return part if role is None else part[part[role] == True]  # noqa: E712 (object column with None)


def test_parse_market_name_examples():
    assert parse_market_name("0002_c1s1_000451_03.jpg") == (2, 1)
    assert parse_market_name("-1_c6s2_012345_00.jpg") == (-1, 6)
    assert parse_market_name("0000_c3s1_000251_04.jpg") == (0, 3)
    for bad, reason in [
        ("0002_c7s1_000451_03.jpg", "camera 7"),
        ("1502_c1s1_000451_03.jpg", "above 1501"),
        ("2_c1s1_000451_03.jpg", "PPPP_cCsS"),
        ("0002_c1s1_000451.jpg", "PPPP_cCsS"),
    ]:
        with pytest.raises(ValueError, match=reason):
            parse_market_name(bad)


def test_small_tree_rows_columns_and_protocol(tmp_path):
    conversion = convert_market1501(write_market_tree(tmp_path / "Market-1501-v15.09.15"))
    df = conversion.df
    assert list(df.columns) == ["label", "path", "split", "is_query", "is_gallery", "camera", "sequence"]
    train, query = rows(df, "train"), rows(df, "validation", IS_QUERY_COLUMN)
    gallery = rows(df, "validation", IS_GALLERY_COLUMN)
    assert sorted(train[PATHS_COLUMN]) == sorted(f"bounding_box_train/{n}" for n in MARKET_TRAIN)
    assert sorted(query[PATHS_COLUMN]) == sorted(f"query/{n}" for n in MARKET_QUERY)
    kept = [n for n in MARKET_GALLERY if not n.startswith("-1")]
    assert sorted(gallery[PATHS_COLUMN]) == sorted(f"bounding_box_test/{n}" for n in kept)
    assert len(df) == 5 + 3 + 7
    # train rows leave the flags empty; validation rows are exactly one of query/gallery
    assert train[IS_QUERY_COLUMN].isna().all() and train[IS_GALLERY_COLUMN].isna().all()
    assert set(query[IS_GALLERY_COLUMN]) == {False} and len(set(query.index) & set(gallery.index)) == 0
    assert sorted(set(train[LABELS_COLUMN])) == [2, 7]
    assert sorted(set(query[LABELS_COLUMN])) == [1, 3]
    assert sorted(set(gallery[LABELS_COLUMN])) == [0, 1, 3]  # 0000 kept as distractor
    by_path = df.set_index(PATHS_COLUMN)
    assert by_path.loc["bounding_box_test/0000_c3s1_000251_04.jpg", SEQUENCE_COLUMN] == "0_c3"
    assert by_path.loc["query/0003_c4s2_000051_00.jpg", SEQUENCE_COLUMN] == "3_c4"
    assert by_path.loc["bounding_box_train/0007_c3s2_000201_01.jpg", "camera"] == 3
    assert df[SEQUENCE_COLUMN].notna().all()
    assert (df[SEQUENCE_COLUMN] == df[LABELS_COLUMN].astype(str) + "_c" + df["camera"].astype(str)).all()
    report = conversion.report
    assert report.skipped[JUNK_REASON] == [
        "bounding_box_test/-1_c1s1_000401_03.jpg",
        "bounding_box_test/-1_c2s1_000551_02.jpg",
    ]
    assert report.skipped["non-image files ignored"] == ["bounding_box_test/Thumbs.db"]
    assert "2 distractor images (person id 0000) kept in the gallery as negatives" in report.notes
    assert len(report.warnings) == 1 and "train images: expected 12,936, found 5" in report.warnings[0]


def test_nested_archive_folder_is_found_and_paths_keep_it(tmp_path):
    write_market_tree(tmp_path / "Market-1501-v15.09.15")
    df = convert_market1501(tmp_path).df
    assert df[PATHS_COLUMN].str.startswith("Market-1501-v15.09.15/").all()
    assert (tmp_path / df[PATHS_COLUMN].iloc[0]).is_file()


def test_published_counts_pass_strict(tmp_path):
    conversion = convert_market1501(write_market_published_counts(tmp_path), strict=True)
    df = conversion.df
    assert (df[SPLIT_COLUMN] == "train").sum() == 12_936
    assert (df[IS_QUERY_COLUMN] == True).sum() == 3_368  # noqa: E712
    assert (df[IS_GALLERY_COLUMN] == True).sum() == 15_913  # noqa: E712
    assert ((df[IS_GALLERY_COLUMN] == True) & (df[LABELS_COLUMN] == 0)).sum() == 2_798  # noqa: E712
    assert conversion.report.n_skipped(JUNK_REASON) == 3_819
    assert conversion.report.warnings == []
    # the published numbers agree with each other: 13,115 valid + 2,798 distractors; + 3,819 junk = 19,732
    assert PUBLISHED_COUNTS["gallery images after junk removal"] == 13_115 + 2_798
    assert 15_913 + PUBLISHED_COUNTS["gallery junk images (id -1)"] == 19_732


def test_strict_rejects_a_subset_with_every_mismatch_named(tmp_path):
    with pytest.raises(ConversionError) as error:
        convert_market1501(write_market_tree(tmp_path), strict=True)
    message = str(error.value)
    assert "query images: expected 3,368, found 3" in message
    assert "gallery junk images (id -1): expected 3,819, found 2" in message


def test_missing_folder_is_named(tmp_path):
    write_market_tree(tmp_path)
    for path in (tmp_path / "query").iterdir():
        path.unlink()
    (tmp_path / "query").rmdir()
    with pytest.raises(ConversionError, match=r"missing folder\(s\) query/"):
        convert_market1501(tmp_path)


def test_malformed_name_is_an_error_naming_the_file_unless_skip_bad(tmp_path):
    write_market_tree(tmp_path, gallery=MARKET_GALLERY + ["0003_c9s1_000101_01.jpg"])
    with pytest.raises(ConversionError, match=r"bounding_box_test/0003_c9s1_000101_01\.jpg: camera 9 is outside 1-6"):
        convert_market1501(tmp_path)
    conversion = convert_market1501(tmp_path, skip_bad=True)
    assert conversion.report.skipped[BAD_NAME_REASON] == ["bounding_box_test/0003_c9s1_000101_01.jpg"]
    assert (conversion.df[IS_GALLERY_COLUMN] == True).sum() == 7  # noqa: E712


def test_hidden_files_are_ignored_not_parsed(tmp_path):
    # a macOS resource fork ("._" + the image's name, AppleDouble bytes) left behind by copying from a Mac
    write_market_tree(tmp_path)
    write(tmp_path / "bounding_box_test" / "._0001_c2s1_000401_01.jpg", b"\x00\x05\x16\x07")
    conversion = convert_market1501(tmp_path)  # no --skip-bad needed
    report, df = conversion.report, conversion.df
    assert report.skipped["non-image files ignored"] == [
        "bounding_box_test/._0001_c2s1_000401_01.jpg",
        "bounding_box_test/Thumbs.db",
    ]
    assert BAD_NAME_REASON not in report.skipped
    assert len(df) == 5 + 3 + 7 and (df[IS_GALLERY_COLUMN] == True).sum() == 7  # noqa: E712
    assert not df[PATHS_COLUMN].str.contains("/._").any()
    assert "gallery images after junk removal: expected 15,913, found 7" in report.warnings[0]
    assert report.n_skipped(JUNK_REASON) == 2


def test_junk_or_distractor_outside_the_gallery_is_rejected(tmp_path):
    write_market_tree(tmp_path, query=MARKET_QUERY + ["-1_c3s1_000111_00.jpg"])
    with pytest.raises(ConversionError, match=r"found in query/: query/-1_c3s1_000111_00\.jpg"):
        convert_market1501(tmp_path)


def test_person_in_train_and_test_is_rejected(tmp_path):
    write_market_tree(tmp_path, train=MARKET_TRAIN + ["0003_c2s1_000999_01.jpg"])
    with pytest.raises(ConversionError, match=r"in both bounding_box_train/ and query/gallery: 3"):
        convert_market1501(tmp_path)


def test_query_without_cross_camera_match_is_an_error_or_skipped(tmp_path):
    # person 3's only gallery images come from camera 4, the query's own camera
    gallery = [n for n in MARKET_GALLERY if not n.startswith("0003_c6")]
    write_market_tree(tmp_path, gallery=gallery)
    message = r"1 query image\(s\) have no gallery image.*query/0003_c4s2_000051_00\.jpg"
    with pytest.raises(ConversionError, match=message):
        convert_market1501(tmp_path)
    conversion = convert_market1501(tmp_path, skip_bad=True)
    assert conversion.report.skipped[INVALID_QUERY_REASON] == ["query/0003_c4s2_000051_00.jpg"]
    assert sorted(conversion.df.loc[conversion.df[IS_QUERY_COLUMN] == True, LABELS_COLUMN]) == [1, 1]  # noqa: E712


def test_cli_writes_atomically_and_oml_masks_same_person_same_camera(tmp_path, capsys):
    root = write_market_tree(tmp_path / "market")
    assert main([str(root)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"validation query +3 +2\n", printed)
    assert "2  junk images (person id -1) dropped from the gallery" in printed
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["dataset.csv", "readme.txt"]  # no temp file

    # OML reads the CSV and, through `sequence`, leaves each query's same-person-same-camera shots out
    from oml.datasets.images import get_retrieval_images_datasets
    from oml.retrieval import RetrievalResults

    torch.manual_seed(0)
    _, valid = get_retrieval_images_datasets(root, None, None, dataframe_name="dataset.csv", verbose=False)
    df = pd.read_csv(root / "dataset.csv")
    val = df[df[SPLIT_COLUMN] == "validation"].reset_index(drop=True)
    query = val[val[IS_QUERY_COLUMN] == True]  # noqa: E712
    gallery = val[val[IS_GALLERY_COLUMN] == True].reset_index(drop=True)  # noqa: E712
    results = RetrievalResults.from_embeddings(torch.randn(len(val), 8), valid, n_items=len(gallery))
    for q, (_, row) in enumerate(query.iterrows()):
        expected = gallery.index[(gallery[LABELS_COLUMN] == row[LABELS_COLUMN]) & (gallery["camera"] != row["camera"])]
        assert sorted(results.gt_ids[q].tolist()) == sorted(expected)
        masked = gallery.index[gallery[SEQUENCE_COLUMN] == row[SEQUENCE_COLUMN]]
        assert not set(results.retrieved_ids[q].tolist()) & set(masked)
        assert len(results.retrieved_ids[q]) == len(gallery) - len(masked)
    # first query (person 1, camera 1): one gallery shot shares its camera, two do not
    assert query.iloc[0][PATHS_COLUMN] == "query/0001_c1s1_001051_00.jpg" and len(results.gt_ids[0]) == 2


def test_cli_error_leaves_no_csv(tmp_path, capsys):
    write_market_tree(tmp_path, gallery=MARKET_GALLERY + ["garbage.jpg"])
    assert main([str(tmp_path)]) == 1
    assert "error: bounding_box_test/garbage.jpg: name does not follow" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.csv")) and not list(tmp_path.glob(".dataset.csv.*"))


def test_runs_as_a_script(tmp_path):
    root = write_market_tree(tmp_path / "m")
    out = tmp_path / "out" / "market.csv"
    done = subprocess.run(
        [sys.executable, "converters/market1501.py", str(root), "--out", str(out)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert len(pd.read_csv(out)) == 15
