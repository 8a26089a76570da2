"""Shared converter pieces: the format checks, the summary and the atomic write."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from converters.common import (
    Conversion,
    ConversionError,
    ConversionReport,
    check_expected_counts,
    make_rows_frame,
    summarize,
    validate_dataframe,
    write_csv_atomically,
)

COLUMNS = ["label", "path", "split", "is_query", "is_gallery"]


def small_frame(root: Path, **extra_columns) -> pd.DataFrame:
    """2 train rows, 2 queries, 3 gallery images (labels 5 and 6); the files exist under root."""
    rows = [
        (1, "t/a.jpg", "train", None, None),
        (2, "t/b.jpg", "train", None, None),
        (5, "q/c.jpg", "validation", True, False),
        (6, "q/d.jpg", "validation", True, False),
        (5, "g/e.jpg", "validation", False, True),
        (6, "g/f.jpg", "validation", False, True),
        (6, "g/g.jpg", "validation", False, True),
    ]
    for _, path, *_ in rows:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(b"")
    df = make_rows_frame([dict(zip(COLUMNS, r)) for r in rows], COLUMNS)
    for name, values in extra_columns.items():
        df[name] = values
    return df


def test_valid_frame_passes_and_the_summary_counts_it(tmp_path):
    df = small_frame(tmp_path)
    validate_dataframe(df, tmp_path)
    report = ConversionReport("toy", label_noun="identities")
    report.skip("junk", "x/1.jpg")
    report.skip("junk", "x/2.jpg")
    report.note("a note")
    report.warn("a doubt")
    assert summarize(Conversion(df, report, tmp_path)).splitlines() == [
        "toy: 7 rows",
        "  split      role        images  identities",
        "  train      -                2           2",
        "  validation query            2           2",
        "  validation gallery          3           2",
        "skipped:",
        "        2  junk: x/1.jpg, x/2.jpg",
        "note: a note",
        "WARNING: a doubt",
    ]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda df: df.drop(index=[4]), "query label\\(s\\) with no gallery image \\(OML rejects them\\): 5"),
        (lambda df: df.assign(x_1=0, x_2=5, y_1=0, y_2=[5, 5, 5, 5, 5, 5, None]),
         r"row 8 \(path=g/g.jpg\): a box needs all of \['x_1', 'y_1', 'x_2', 'y_2'\] or none"),
        (lambda df: df.assign(x_1=0, x_2=[5, 5, 5, 5, 5, 5, 0], y_1=0, y_2=5),
         r"row 8 \(path=g/g.jpg\): box x_1=0, y_1=0, x_2=0, y_2=5 needs x_1 < x_2"),
        (lambda df: df.assign(is_query=[True, None, True, True, False, False, False]), "train rows must leave"),
        (lambda df: df.assign(split=["train", "train", "test", "validation", "validation", "validation", "validation"]),
         r"`split` must be 'train' or 'validation', found \['test'\]; first at row 4 \(path=q/c.jpg\) has 'test'"),
        (lambda df: pd.concat([df, df.iloc[[2]]], ignore_index=True), "listed twice as is_query: q/c.jpg"),
    ],
)  # fmt: skip
def test_bad_frames_get_a_clear_message(tmp_path, change, message):
    with pytest.raises(ConversionError, match=message):
        validate_dataframe(change(small_frame(tmp_path)), tmp_path)


def test_a_missing_sequence_is_its_own_group_for_the_converters_and_the_reader(tmp_path):
    """One rule (metriclab.data.contract): a row without a `sequence` is accepted and grouped with no other row."""
    from metriclab.data.contract import sequence_groups
    from metriclab.data.datasets import read_dataset_csv

    df = small_frame(tmp_path, sequence=["a", "b", "s1", None, "s1", None, "s2"])
    validate_dataframe(df, tmp_path)  # the converters' check accepts it (it used to reject it)
    write_csv_atomically(df, tmp_path / "dataset.csv", tmp_path)
    read = read_dataset_csv(tmp_path)  # and so does the reader, from the written file
    groups = sequence_groups(read["sequence"].tolist())
    assert groups.tolist() == ["a", "b", "s1", "__row3", "s1", "__row5", "s2"]


def test_reader_and_converters_give_the_same_message(tmp_path):
    """Both go through the one validator: the same bad table fails with the same rule, naming the CSV line."""
    from metriclab.core.errors import ConfigError
    from metriclab.data.datasets import read_dataset_csv

    df = small_frame(tmp_path)
    df["is_gallery"] = df["is_gallery"].astype(object)
    df.loc[5, "is_gallery"] = "maybe"
    expected = r"row 7 \(path=g/f.jpg\): `is_gallery` must be True/False for validation rows, got 'maybe'"
    with pytest.raises(ConversionError, match=expected):
        validate_dataframe(df, tmp_path)
    df.to_csv(tmp_path / "dataset.csv", index=False)
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'dataset.csv'}: {expected}"):
        read_dataset_csv(tmp_path)


def test_oml_checker_runs_too(tmp_path):
    df = small_frame(tmp_path)
    (tmp_path / "g" / "g.jpg").unlink()
    with pytest.raises(ConversionError, match="OML's format check rejected the dataframe: Following paths do not"):
        validate_dataframe(df, tmp_path)


def test_atomic_write_replaces_only_a_valid_file(tmp_path):
    out = tmp_path / "dataset.csv"
    out.write_text("old content\n")
    df = small_frame(tmp_path)
    with pytest.raises(ConversionError):
        write_csv_atomically(df.drop(index=[4]), out, tmp_path)
    assert out.read_text() == "old content\n"  # a failed write leaves the previous file alone
    write_csv_atomically(df, out, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["dataset.csv"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # readable like any other file, not mkstemp's 0600
    assert out.read_text().splitlines()[:4] == [
        "label,path,split,is_query,is_gallery",
        "1,t/a.jpg,train,,",  # train rows leave the flags empty
        "2,t/b.jpg,train,,",
        "5,q/c.jpg,validation,True,False",
    ]


def test_expected_counts_warn_or_fail(tmp_path):
    report = ConversionReport("toy")
    check_expected_counts({"a": 1, "b": 2}, {"a": 1, "b": 3}, strict=False, report=report, what="toy")
    assert report.warnings == ["counts differ from the published toy ones: b: expected 3, found 2"]
    with pytest.raises(ConversionError, match="b: expected 3, found 2. Drop --strict"):
        check_expected_counts({"a": 1, "b": 2}, {"a": 1, "b": 3}, strict=True, report=report, what="toy")
    check_expected_counts({"a": 1}, {"a": 1}, strict=True, report=report, what="toy")
    assert report.notes == ["all published toy counts match (1 checked)"]
