"""Datasets from OML's CSV format (`label, path, split, is_query, is_gallery` [+ category, sequence, boxes]).

The CSV is read and checked by `metriclab.data.contract` (`read_dataset_csv`, re-exported here).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pandas as pd
from oml.datasets import ImageLabeledDataset

from metriclab.core.constants import (
    CATEGORIES_COLUMN,
    CLASS_NAME_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SEQUENCE_COLUMN,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
)
from metriclab.core.errors import ConfigError
from metriclab.data.contract import read_dataset_csv, sequence_groups


def class_names(df: pd.DataFrame) -> np.ndarray:
    """What to call each row's class in figures and tables: its `class_name` when the CSV has that column, else its
    label, as strings."""
    column = CLASS_NAME_COLUMN if CLASS_NAME_COLUMN in df.columns else LABELS_COLUMN
    return df[column].astype(str).to_numpy()


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
        # the contract's rule: a row without a sequence is its own group (OML would group all of them together)
        return sequence_groups(self.df[SEQUENCE_COLUMN].astype(object).tolist())

    @cached_property
    def categories(self) -> Optional[np.ndarray]:
        if CATEGORIES_COLUMN not in self.df.columns:
            return None
        return self.df[CATEGORIES_COLUMN].astype(str).to_numpy()

    @property
    def paths(self) -> np.ndarray:
        return self.df[PATHS_COLUMN].to_numpy()


def build_train_data(df: pd.DataFrame, root: Path, transform: Any, cache_size: int = 0) -> TrainData:
    train = df[df[SPLIT_COLUMN] == TRAIN_SPLIT].reset_index(drop=True).copy()
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
    val = df[df[SPLIT_COLUMN] == VALIDATION_SPLIT].reset_index(drop=True).copy()
    if val.empty:
        raise ConfigError(f"{root}: the CSV has no `split=validation` rows: nothing to validate on")
    if not val[IS_QUERY_COLUMN].any() or not val[IS_GALLERY_COLUMN].any():
        raise ConfigError(f"{root}: validation rows need at least one query and one gallery row")
    dataset = ImageLabeledDataset(val, dataset_root=root, transform=transform, cache_size=cache_size)
    return ValidationData(dataset, val, Path(root))


__all__ = ["TrainData", "ValidationData", "build_train_data", "build_validation_data", "class_names",
           "read_dataset_csv"]
