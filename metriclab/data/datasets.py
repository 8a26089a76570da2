"""Datasets from OML's CSV format (`label, path, split, is_query, is_gallery` [+ category, sequence, boxes])."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
from oml.const import (
    CATEGORIES_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SEQUENCE_COLUMN,
    SPLIT_COLUMN,
)
from oml.datasets import ImageLabeledDataset

from metriclab.core.errors import ConfigError

CLASS_NAME_COLUMN = "class_name"  # optional, written by the fruits and cars converters
REQUIRED_COLUMNS = (LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN)
BOOL_STRINGS = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}


def _to_bool(df: pd.DataFrame, rows: pd.Series, column: str, csv_path: Path) -> np.ndarray:
    """`column` of the selected rows as booleans; a bad value names its CSV line (frame index + 2: header, 0-based)."""
    out = []
    for row, value in df.loc[rows, column].items():
        if isinstance(value, (bool, np.bool_)):
            out.append(bool(value))
            continue
        key = str(value).strip().lower()
        if key not in BOOL_STRINGS:
            raise ConfigError(f"{csv_path}: row {row + 2} ({PATHS_COLUMN}={df.at[row, PATHS_COLUMN]}): `{column}` "
                              f"must be True/False for validation rows, got {value!r}")
        out.append(BOOL_STRINGS[key])
    return np.array(out, dtype=bool)


def _first_non_integer(csv_path: Path, df: pd.DataFrame) -> str:
    """'; row N (path=...) has VALUE' for the first `label` cell that is not an integer as written in the CSV (the
    parsed column cannot tell 1.0 from 1), or '' if every cell looks like one."""
    text = pd.read_csv(csv_path, usecols=[LABELS_COLUMN], dtype=str)[LABELS_COLUMN]
    bad = np.flatnonzero(~text.str.fullmatch(r"\s*[+-]?\d+\s*").fillna(False).to_numpy(dtype=bool))
    if len(bad) == 0:
        return ""
    row = int(bad[0])
    return f"; row {row + 2} ({PATHS_COLUMN}={df.at[row, PATHS_COLUMN]}) has {text.iat[row]!r}"


def class_names(df: pd.DataFrame) -> np.ndarray:
    """What to call each row's class in figures and tables: its `class_name` when the CSV has that column, else its
    label, as strings."""
    column = CLASS_NAME_COLUMN if CLASS_NAME_COLUMN in df.columns else LABELS_COLUMN
    return df[column].astype(str).to_numpy()


def read_dataset_csv(root: str | Path, csv_name: str = "dataset.csv") -> pd.DataFrame:
    """Read and check the CSV; every error names the file, the row or the column and says what to do."""
    root = Path(root)
    csv_path = root / csv_name
    if not root.is_dir():
        raise ConfigError(f"dataset.root={root} is not a folder: point `dataset.root=` at the converted dataset")
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path} does not exist: run a converter first (make convert-market/convert-cars/"
                          f"convert-fruits DATA={root}) or set `dataset.csv=<name>`")
    df = pd.read_csv(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{csv_path}: missing column(s) {missing}; OML's format needs {list(REQUIRED_COLUMNS)}")
    split_ok = df[SPLIT_COLUMN].astype(str).isin(["train", "validation"])
    if not split_ok.all():
        bad_split = sorted(set(df.loc[~split_ok, SPLIT_COLUMN].astype(str)), key=str)  # pandas 3 keeps NaN
        row = int(np.flatnonzero(~split_ok)[0])
        raise ConfigError(f"{csv_path}: `split` must be 'train' or 'validation', found {bad_split}; first at row "
                          f"{row + 2} ({PATHS_COLUMN}={df.at[row, PATHS_COLUMN]}) has {df.at[row, SPLIT_COLUMN]!r}")
    if df[LABELS_COLUMN].isna().any():
        row = int(np.flatnonzero(df[LABELS_COLUMN].isna())[0])
        raise ConfigError(f"{csv_path}: row {row + 2} has an empty `label`")
    if not pd.api.types.is_integer_dtype(df[LABELS_COLUMN]):
        raise ConfigError(f"{csv_path}: `label` must be integers, got dtype {df[LABELS_COLUMN].dtype}"
                          f"{_first_non_integer(csv_path, df)}")
    df[PATHS_COLUMN] = df[PATHS_COLUMN].astype(str)
    val = df[SPLIT_COLUMN] == "validation"
    for col in (IS_QUERY_COLUMN, IS_GALLERY_COLUMN):
        values = pd.Series(False, index=df.index, dtype=bool)
        if val.any():
            values[val] = _to_bool(df, val, col, csv_path)
        df[col] = values
    missing_files = [p for p in df[PATHS_COLUMN].head(50) if not (root / p).is_file()]
    if missing_files:  # a cheap spot check: a wrong root shows up in the first rows
        raise ConfigError(f"{csv_path}: image {root / missing_files[0]} does not exist ({len(missing_files)} of the "
                          f"first 50 rows are missing): is `dataset.root` the folder the CSV paths are relative to?")
    return df.reset_index(drop=True)


@dataclass
class TrainData:
    dataset: ImageLabeledDataset
    labels: np.ndarray  # remapped 0..n_classes-1, row order of the dataset
    n_classes: int
    label2category: Optional[Dict[int, Any]]


@dataclass
class ValidationData:
    """The validation rows and what the metric engine needs about them (row order = dataset index).

    The array views are computed once and cached: `df` must not change after construction (nothing does)."""

    dataset: ImageLabeledDataset
    df: pd.DataFrame
    root: Path

    @cached_property
    def labels(self) -> np.ndarray:
        return self.df[LABELS_COLUMN].to_numpy()

    @cached_property
    def is_query(self) -> np.ndarray:
        return self.df[IS_QUERY_COLUMN].to_numpy(dtype=bool)

    @cached_property
    def is_gallery(self) -> np.ndarray:
        return self.df[IS_GALLERY_COLUMN].to_numpy(dtype=bool)

    @cached_property
    def sequences(self) -> Optional[np.ndarray]:
        if SEQUENCE_COLUMN not in self.df.columns:
            return None
        seq = self.df[SEQUENCE_COLUMN].astype(object)
        # a missing sequence must not group rows together (OML treats all NaN as one sequence): give it its own
        return np.array([f"__row{i}" if pd.isna(s) else str(s) for i, s in enumerate(seq)], dtype=object)

    @cached_property
    def categories(self) -> Optional[np.ndarray]:
        if CATEGORIES_COLUMN not in self.df.columns:
            return None
        return self.df[CATEGORIES_COLUMN].astype(str).to_numpy()

    @property
    def paths(self) -> np.ndarray:
        return self.df[PATHS_COLUMN].to_numpy()


def build_train_data(df: pd.DataFrame, root: Path, transform: Any, cache_size: int = 0) -> TrainData:
    train = df[df[SPLIT_COLUMN] == "train"].reset_index(drop=True).copy()
    if train.empty:
        raise ConfigError(f"{root}: the CSV has no `split=train` rows: nothing to train on")
    codes, uniques = pd.factorize(train[LABELS_COLUMN], sort=True)
    train[LABELS_COLUMN] = codes  # losses with class weights need labels 0..n-1
    label2category = None
    if CATEGORIES_COLUMN in train.columns:
        label2category = dict(zip(train[LABELS_COLUMN].tolist(), train[CATEGORIES_COLUMN].tolist()))
    dataset = ImageLabeledDataset(train, dataset_root=root, transform=transform, cache_size=cache_size)
    return TrainData(dataset, train[LABELS_COLUMN].to_numpy(), len(uniques), label2category)


def build_validation_data(df: pd.DataFrame, root: Path, transform: Any, cache_size: int = 0) -> ValidationData:
    val = df[df[SPLIT_COLUMN] == "validation"].reset_index(drop=True).copy()
    if val.empty:
        raise ConfigError(f"{root}: the CSV has no `split=validation` rows: nothing to validate on")
    if not val[IS_QUERY_COLUMN].any() or not val[IS_GALLERY_COLUMN].any():
        raise ConfigError(f"{root}: validation rows need at least one query and one gallery row")
    dataset = ImageLabeledDataset(val, dataset_root=root, transform=transform, cache_size=cache_size)
    return ValidationData(dataset, val, Path(root))
