"""Batch samplers built from `configs/sampler/*.yaml` (the pipeline injects ``labels`` and ``label2category``).

Thin wrappers over OML's ``BalanceSampler`` / ``CategoryBalanceSampler``, which differ from what we need on labels
with few images: OML samples such a label *with repetition* (the same image several times in a batch, i.e. zero
distance positives), and it refuses (asserts) any dataset with a single-image label. Here a label with fewer than
``n_instances`` images sits out: it is counted (``n_labels_dropped``) and logged, and OML's sampler runs on the
remaining labels; its batch indices are mapped back to dataset indices.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from oml.const import CATEGORIES_COLUMN
from oml.interfaces.samplers import IBatchSampler
from oml.samplers import BalanceSampler as OMLBalanceSampler
from oml.samplers import CategoryBalanceSampler as OMLCategoryBalanceSampler

log = logging.getLogger(__name__)


def _as_label_list(labels: Any) -> List[Any]:
    if hasattr(labels, "tolist"):
        labels = labels.tolist()
    labels = list(labels)
    if not labels:
        raise ValueError("the sampler got no labels: the train split is empty")
    return labels


def _sorted(values: Any) -> List[Any]:
    try:
        return sorted(values)
    except TypeError:  # mixed label types: any stable order will do
        return sorted(values, key=str)


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < minimum:
        raise ValueError(f"sampler `{name}` must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_categorised(labels: List[Any], label2category: Mapping[Any, Any]) -> None:
    missing = _sorted({label for label in labels if label not in label2category})
    if missing:
        raise ValueError(
            f"CategoryBalanceSampler: {len(missing)} labels have no category (first: {missing[:5]}): "
            f"every row of the CSV needs a `{CATEGORIES_COLUMN}` value"
        )


def _group_by_category(kept: List[Any], label2category: Mapping[Any, Any]) -> Dict[Any, List[Any]]:
    """category -> its distinct labels, in sorted label order."""
    category2labels: Dict[Any, List[Any]] = {}
    for label in _sorted(set(kept)):
        category2labels.setdefault(label2category[label], []).append(label)
    return category2labels


class _LabelSubsetSampler(IBatchSampler):
    """Keeps the labels with >= n_instances images; runs an OML sampler over them; maps indices back."""

    def _split_labels(self, labels: List[Any], n_instances: int, sampler_name: str) -> List[Any]:
        counts = Counter(labels)
        dropped = _sorted([label for label, n in counts.items() if n < n_instances])
        dropped_set = set(dropped)
        self.n_labels_total = len(counts)
        self.dropped_labels = dropped
        self.n_labels_dropped = len(dropped)
        self.n_images_dropped = sum(counts[label] for label in dropped)
        self._positions = np.array([i for i, label in enumerate(labels) if label not in dropped_set], dtype=np.int64)
        kept = [labels[i] for i in self._positions]
        message = (
            "%s: %d of %d labels have fewer than n_instances=%d images and sit out (%d of %d images unused)"
        )
        args = (
            sampler_name, self.n_labels_dropped, self.n_labels_total, n_instances, self.n_images_dropped, len(labels)
        )
        (log.warning if self.n_labels_dropped else log.info)(message, *args)
        return kept

    def __len__(self) -> int:
        return len(self._sampler)

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._sampler:
            yield self._positions[np.asarray(batch, dtype=np.int64)].tolist()

    @property
    def batch_size(self) -> int:
        return self._sampler.batch_size


class BalanceSampler(_LabelSubsetSampler):
    """Batches of ``n_labels`` labels x ``n_instances`` images each (OML ``BalanceSampler``): every usable label once
    per epoch, ``len = usable labels // n_labels`` batches."""

    def __init__(self, labels: Sequence[int], n_labels: int, n_instances: int):
        labels = _as_label_list(labels)
        n_labels = _check_int("n_labels", n_labels, 2)
        n_instances = _check_int("n_instances", n_instances, 2)
        kept = self._split_labels(labels, n_instances, "BalanceSampler")
        n_usable = len(set(kept))
        if n_usable < n_labels:
            raise ValueError(
                f"BalanceSampler: n_labels={n_labels} but only {n_usable} of {self.n_labels_total} train labels have "
                f">= n_instances={n_instances} images: lower sampler.n_labels or sampler.n_instances"
            )
        self.n_labels = n_labels
        self.n_instances = n_instances
        self._sampler = OMLBalanceSampler(labels=kept, n_labels=n_labels, n_instances=n_instances)


class CategoryBalanceSampler(_LabelSubsetSampler):
    """Batches of ``n_categories`` categories x ``n_labels`` labels x ``n_instances`` images (OML
    ``CategoryBalanceSampler``; ``len = ceil(usable labels / n_labels)`` batches, categories drawn with weights
    proportional to their label counts when ``weight_categories``).

    Needs the dataset's ``category`` column. A label with fewer than ``n_instances`` images sits out; so does a
    category left with fewer than ``n_labels`` usable labels, unless ``resample_labels`` (then its labels are drawn
    with repetition), counted in ``n_categories_dropped`` / ``n_labels_in_dropped_categories``.
    """

    def __init__(
        self,
        labels: Sequence[int],
        label2category: Optional[Mapping[Any, Any]],
        n_categories: int,
        n_labels: int,
        n_instances: int,
        resample_labels: bool = False,
        weight_categories: bool = True,
    ):
        if label2category is None:
            raise ValueError(
                f"sampler=category_balance needs a `{CATEGORIES_COLUMN}` column in the dataset CSV (one category per "
                f"label); this dataset has none: add the column or use sampler=balance"
            )
        labels = _as_label_list(labels)
        n_categories = _check_int("n_categories", n_categories, 1)
        n_labels = _check_int("n_labels", n_labels, 2)
        n_instances = _check_int("n_instances", n_instances, 2)
        _check_categorised(labels, label2category)
        kept = self._split_labels(labels, n_instances, "CategoryBalanceSampler")
        category2labels = _group_by_category(kept, label2category)
        kept, category2labels = self._drop_small_categories(labels, category2labels, n_labels, resample_labels)

        if len(category2labels) < n_categories:
            raise ValueError(
                f"CategoryBalanceSampler: n_categories={n_categories} but only {len(category2labels)} categories have "
                f">= n_labels={n_labels} labels with >= n_instances={n_instances} images each: lower "
                f"sampler.n_categories / n_labels / n_instances"
            )
        kept_label2category = {label: label2category[label] for label in set(kept)}
        self.n_categories = n_categories
        self.n_labels = n_labels
        self.n_instances = n_instances
        self._sampler = OMLCategoryBalanceSampler(
            labels=kept,
            label2category=kept_label2category,
            n_categories=n_categories,
            n_labels=n_labels,
            n_instances=n_instances,
            resample_labels=bool(resample_labels),
            weight_categories=bool(weight_categories),
        )

    def _drop_small_categories(
        self, labels: List[Any], category2labels: Dict[Any, List[Any]], n_labels: int, resample_labels: bool
    ) -> Tuple[List[Any], Dict[Any, List[Any]]]:
        """Unless ``resample_labels``, categories with fewer than ``n_labels`` usable labels sit out (counted and
        logged); returns the labels still sampled (one per kept image) and the remaining categories."""
        small = {c: ls for c, ls in category2labels.items() if len(ls) < n_labels}
        self.n_categories_dropped = 0
        self.n_labels_in_dropped_categories = 0
        if small and not resample_labels:
            self.n_categories_dropped = len(small)
            self.n_labels_in_dropped_categories = sum(len(ls) for ls in small.values())
            log.warning(
                "CategoryBalanceSampler: %d of %d categories have fewer than n_labels=%d usable labels and sit out "
                "(%d labels); set resample_labels=true to draw their labels with repetition instead",
                len(small), len(category2labels), n_labels, self.n_labels_in_dropped_categories,
            )
            gone = {label for ls in small.values() for label in ls}
            keep_positions = np.array([labels[i] not in gone for i in self._positions], dtype=bool)
            self._positions = self._positions[keep_positions]
            category2labels = {c: ls for c, ls in category2labels.items() if c not in small}
        return [labels[i] for i in self._positions], category2labels


__all__ = ["BalanceSampler", "CategoryBalanceSampler"]
