"""Datasets from OML's CSV format (`label, path, split, is_query, is_gallery` [+ category, sequence, boxes]).

The CSV is read and checked by `metriclab.data.contract` (`read_dataset_csv`, re-exported here). An image that
exists but cannot be read or decoded is found only when it is read: the datasets name its file and CSV line, and
`on_bad_image` (`dataset.on_bad_image`) says what happens then: `error` stops with that message, `skip` lets a
blank image (zeros, shaped like a readable item's) stand in for it (the row keeps its label and index, so batches
and metrics stay aligned) and logs a counted warning. Dropping the row inside a running epoch would break the
sampler's and the metrics' indexing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Dict, Optional

import cv2
import numpy as np
import pandas as pd
import torch
from oml.datasets import ImageLabeledDataset
from PIL import UnidentifiedImageError

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
from metriclab.core.schemas import ON_BAD_IMAGE
from metriclab.data.contract import CSV_PATH_ATTR, read_dataset_csv, sequence_groups

log = logging.getLogger(__name__)

#: failures of reading or decoding a file (PIL raises OSError subclasses, OML's cv2 reader cv2.error)
READ_ERRORS = (OSError, cv2.error)


def class_names(df: pd.DataFrame) -> np.ndarray:
    """What to call each row's class in figures and tables: its `class_name` when the CSV has that column, else its
    label, as strings."""
    column = CLASS_NAME_COLUMN if CLASS_NAME_COLUMN in df.columns else LABELS_COLUMN
    return df[column].astype(str).to_numpy()


def read_failure(error: BaseException) -> str:
    """A read error as a short reason: what cv2 and PIL say about bytes they cannot decode means nothing to a user."""
    text = str(error).strip()
    last = text.splitlines()[-1] if text else ""
    if isinstance(error, UnidentifiedImageError) or "_src.empty()" in last:
        return "not a decodable image"
    return f"{type(error).__name__}: {last}" if last else type(error).__name__


class CheckedImageDataset(ImageLabeledDataset):
    """OML's labelled image dataset whose read failures name the image file and its CSV line (`csv_lines[i]` is
    item i's line in `source`), handled as `on_bad_image` says (see the module docstring); `skipped` counts the
    stand-ins this process served."""

    def __init__(self, df: pd.DataFrame, root: Path, transform: Any, cache_size: int, csv_lines: np.ndarray,
                 source: str, on_bad_image: str = "error"):
        if on_bad_image not in ON_BAD_IMAGE:
            raise ConfigError(f"`dataset.on_bad_image={on_bad_image}` is not supported; choose one of "
                              f"{list(ON_BAD_IMAGE)}")
        super().__init__(df, dataset_root=root, transform=transform, cache_size=cache_size)
        self.root = Path(root)
        self.blank: Optional[torch.Tensor] = None  # what stands in for an unreadable image (skip)
        self.csv_lines = np.asarray(csv_lines)
        self.source = source
        self.on_bad_image = on_bad_image
        self.skipped = 0

    def describe(self, item: int) -> str:
        path = self.df[PATHS_COLUMN].iat[item]
        return f"{self.source}: row {int(self.csv_lines[item])} (path={path}): image {self.root / path}"

    def __getitem__(self, item: int) -> Dict[str, Any]:
        try:
            return super().__getitem__(item)
        except READ_ERRORS as e:
            if self.on_bad_image == "error":
                raise ConfigError(f"{self.describe(item)} cannot be read ({read_failure(e)}): replace the file or "
                                  f"remove the row, or set `dataset.on_bad_image=skip`") from e
            self.skipped += 1
            log.warning("%s cannot be read (%s): a blank image stands in for it (dataset.on_bad_image=skip; %d "
                        "skipped so far in this process)", self.describe(item), read_failure(e), self.skipped)
            return self.stand_in(item)
        except Exception as e:  # not a read failure (a transform, a box): keep its traceback, say which image
            e.add_note(f"while reading {self.describe(item)}")
            raise

    def stand_in(self, item: int) -> Dict[str, Any]:
        """Item `item` with a blank image (zeros: the normalised mean colour) shaped like a readable item's tensor,
        so it batches with them; then what OML's item holds besides (index, label, extra data)."""
        if self.blank is None:
            for other in range(item + 1, item + len(self)):
                try:
                    self.blank = torch.zeros_like(super().__getitem__(other % len(self))[self.input_tensors_key])
                    break
                except READ_ERRORS:
                    continue
            else:
                raise ConfigError(f"{self.source}: none of the {len(self)} images of this split can be read")
        data = {self.input_tensors_key: self.blank.clone(), self.index_key: item,
                self.labels_key: self.get_labels()[item]}
        for key, record in self.extra_data.items():
            data[key] = record[item]
        return data


def split_rows(df: pd.DataFrame, split: str) -> tuple[pd.DataFrame, np.ndarray, str]:
    """The rows of `split` indexed 0..n-1, their CSV lines and the CSV's name. `df` is as `read_dataset_csv` returns
    it: its index is the CSV row order (line = index + 2)."""
    rows = df[df[SPLIT_COLUMN] == split]
    lines = rows.index.to_numpy() + 2
    return rows.reset_index(drop=True).copy(), lines, str(df.attrs.get(CSV_PATH_ATTR, "the dataset CSV"))


@dataclass
class TrainData:
    dataset: ImageLabeledDataset  # a CheckedImageDataset
    labels: np.ndarray  # remapped 0..n_classes-1, row order of the dataset
    n_classes: int
    label2category: Optional[Dict[int, Any]]


@dataclass
class ValidationData:
    """The validation rows and what the metric engine needs about them (row order = dataset index).

    The array views are computed once and cached: `df` must not change after construction (nothing does)."""

    dataset: ImageLabeledDataset  # a CheckedImageDataset
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


def build_train_data(df: pd.DataFrame, root: Path, transform: Any, cache_size: int = 0,
                     on_bad_image: str = "error") -> TrainData:
    train, lines, source = split_rows(df, TRAIN_SPLIT)
    if train.empty:
        raise ConfigError(f"{root}: the CSV has no `split=train` rows: nothing to train on")
    codes, uniques = pd.factorize(train[LABELS_COLUMN], sort=True)
    train[LABELS_COLUMN] = codes  # losses with class weights need labels 0..n-1
    label2category = None
    if CATEGORIES_COLUMN in train.columns:
        label2category = dict(zip(train[LABELS_COLUMN].tolist(), train[CATEGORIES_COLUMN].tolist()))
    dataset = CheckedImageDataset(train, root, transform, cache_size, lines, source, on_bad_image)
    return TrainData(dataset, train[LABELS_COLUMN].to_numpy(), len(uniques), label2category)


def build_validation_data(df: pd.DataFrame, root: Path, transform: Any, cache_size: int = 0,
                          on_bad_image: str = "error") -> ValidationData:
    val, lines, source = split_rows(df, VALIDATION_SPLIT)
    if val.empty:
        raise ConfigError(f"{root}: the CSV has no `split=validation` rows: nothing to validate on")
    if not val[IS_QUERY_COLUMN].any() or not val[IS_GALLERY_COLUMN].any():
        raise ConfigError(f"{root}: validation rows need at least one query and one gallery row")
    dataset = CheckedImageDataset(val, root, transform, cache_size, lines, source, on_bad_image)
    return ValidationData(dataset, val, Path(root))


__all__ = ["ON_BAD_IMAGE", "CheckedImageDataset", "TrainData", "ValidationData", "build_train_data",
           "build_validation_data", "class_names", "read_dataset_csv"]
