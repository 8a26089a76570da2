"""Samplers: labels with too few images sit out (counted, logged), batch composition, YAML build, clear errors."""
import logging
from collections import Counter

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from oml.samplers import BalanceSampler as OMLBalanceSampler
from torch.utils.data import DataLoader, TensorDataset

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.data.samplers import BalanceSampler, CategoryBalanceSampler

# label: number of images -> 0:5, 1:4, 2:3, 3:1, 4:6, 5:4 (23 images); with n_instances=4 labels 2 and 3 sit out.
COUNTS = {0: 5, 1: 4, 2: 3, 3: 1, 4: 6, 5: 4}
LABELS = [label for label, n in COUNTS.items() for _ in range(n)]
np.random.default_rng(0).shuffle(LABELS)  # dataset order is not grouped by label


def _epoch(sampler, seed=0):
    np.random.seed(seed)
    return list(sampler)


def test_oml_sampler_repeats_images_and_refuses_single_image_labels():
    """Why the wrapper exists: OML pads a small label with repeated images and asserts on a 1-image label."""
    with pytest.raises(AssertionError, match="at least 2 samples"):
        OMLBalanceSampler(LABELS, n_labels=2, n_instances=4)
    no_singletons = [label for label in LABELS if label != 3]
    np.random.seed(0)
    batches = list(OMLBalanceSampler(no_singletons, n_labels=5, n_instances=4))
    assert any(len(set(batch)) < len(batch) for batch in batches)  # label 2 (3 images) gave a repeated index


def test_balance_sampler_drops_small_labels_and_counts_them(caplog):
    with caplog.at_level(logging.INFO, logger="metriclab.data.samplers"):
        sampler = BalanceSampler(LABELS, n_labels=2, n_instances=4)
    assert sampler.n_labels_dropped == 2 and sampler.dropped_labels == [2, 3]
    assert sampler.n_images_dropped == 4 and sampler.n_labels_total == 6
    assert "2 of 6 labels have fewer than n_instances=4 images and sit out (4 of 23 images unused)" in caplog.text
    assert caplog.records[-1].levelno == logging.WARNING
    assert len(sampler) == 2 and sampler.batch_size == 8  # 4 usable labels // 2
    batches = _epoch(sampler)
    assert len(batches) == 2
    seen_labels = []
    for batch in batches:
        assert len(batch) == 8 and len(set(batch)) == 8  # no repeated image
        counts = Counter(LABELS[i] for i in batch)
        assert len(counts) == 2 and set(counts.values()) == {4}
        seen_labels += list(counts)
    assert sorted(seen_labels) == [0, 1, 4, 5]  # every usable label exactly once per epoch, dropped ones never


def test_balance_sampler_without_small_labels_logs_info(caplog):
    labels = [i // 4 for i in range(16)]
    with caplog.at_level(logging.INFO, logger="metriclab.data.samplers"):
        sampler = BalanceSampler(np.array(labels), n_labels=2, n_instances=4)
    assert sampler.n_labels_dropped == 0 and caplog.records[-1].levelno == logging.INFO
    assert sorted(i for batch in _epoch(sampler) for i in batch) == list(range(16))


def test_balance_sampler_feeds_a_dataloader():
    dataset = TensorDataset(torch.arange(len(LABELS)), torch.tensor(LABELS))
    np.random.seed(1)
    loader = DataLoader(dataset, batch_sampler=BalanceSampler(LABELS, n_labels=2, n_instances=4))
    batches = list(loader)
    assert len(batches) == 2
    for idx, labels in batches:
        assert labels.tolist() == [LABELS[i] for i in idx.tolist()]
        assert sorted(Counter(labels.tolist()).values()) == [4, 4]


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_labels=5, n_instances=4), r"n_labels=5 but only 4 of 6 train labels have >= n_instances=4 images"),
    (dict(n_labels=1, n_instances=4), r"`n_labels` must be an integer >= 2"),
    (dict(n_labels=2, n_instances=1), r"`n_instances` must be an integer >= 2"),
    (dict(n_labels=2, n_instances=2.5), r"`n_instances` must be an integer >= 2"),
])
def test_balance_sampler_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BalanceSampler(LABELS, **kwargs)


# Categories: "a" -> labels 0, 1, 2; "b" -> 4, 5; "c" -> 3. Label 2 (3 images) and 3 (1 image) sit out with
# n_instances=4, which leaves category "c" with no label and "a" with 2.
LABEL2CATEGORY = {0: "a", 1: "a", 2: "a", 3: "c", 4: "b", 5: "b"}


def test_category_balance_needs_a_category_column():
    with pytest.raises(ValueError, match=r"needs a `category` column in the dataset CSV"):
        CategoryBalanceSampler(LABELS, None, n_categories=1, n_labels=2, n_instances=2)


def test_category_balance_drops_small_labels_and_categories(caplog):
    label2category = {**LABEL2CATEGORY, 6: "c"}
    labels = LABELS + [6, 6, 6, 6]  # category "c" now has one usable label (6): fewer than n_labels=2
    with caplog.at_level(logging.INFO, logger="metriclab.data.samplers"):
        sampler = CategoryBalanceSampler(labels, label2category, n_categories=2, n_labels=2, n_instances=4)
    assert sampler.n_labels_dropped == 2 and sampler.dropped_labels == [2, 3]
    assert sampler.n_categories_dropped == 1 and sampler.n_labels_in_dropped_categories == 1
    assert "1 of 3 categories have fewer than n_labels=2 usable labels and sit out" in caplog.text
    assert len(sampler) == 2 and sampler.batch_size == 16  # ceil(4 usable labels / 2)
    for batch in _epoch(sampler):
        assert len(batch) == 16 and len(set(batch)) == 16
        counts = Counter(labels[i] for i in batch)
        assert set(counts) == {0, 1, 4, 5} and set(counts.values()) == {4}  # 2 categories x 2 labels x 4 images
        assert Counter(label2category[label] for label in counts) == {"a": 2, "b": 2}


def test_category_balance_resample_labels_keeps_small_categories():
    label2category = {**LABEL2CATEGORY, 6: "c"}
    labels = LABELS + [6, 6, 6, 6]
    sampler = CategoryBalanceSampler(labels, label2category, n_categories=3, n_labels=2, n_instances=4,
                                     resample_labels=True)
    assert sampler.n_categories_dropped == 0 and sampler.n_labels_dropped == 2
    batch = _epoch(sampler)[0]
    assert {label2category[labels[i]] for i in batch} == {"a", "b", "c"}
    assert Counter(labels[i] for i in batch)[6] == 8  # the lone label of "c" fills both label slots


def test_category_balance_errors():
    with pytest.raises(ValueError, match=r"n_categories=3 but only 2 categories"):
        CategoryBalanceSampler(LABELS, LABEL2CATEGORY, n_categories=3, n_labels=2, n_instances=4)
    with pytest.raises(ValueError, match=r"1 labels have no category \(first: \[5\]\)"):
        CategoryBalanceSampler(LABELS, {k: v for k, v in LABEL2CATEGORY.items() if k != 5},
                               n_categories=1, n_labels=2, n_instances=2)


def test_sampler_yamls_build_with_runtime_labels():
    labels = [i // 4 for i in range(40)]  # 10 labels x 4 images
    balance = OmegaConf.load(CONFIGS_DIR / "sampler" / "balance.yaml")
    assert (balance.n_labels, balance.n_instances) == (16, 4)
    balance.merge_with_dotlist(["n_labels=5"])
    sampler = build(balance, "sampler", labels=labels, label2category=None)  # label2category not declared: dropped
    assert isinstance(sampler, BalanceSampler) and len(sampler) == 2 and sampler.batch_size == 20

    category = OmegaConf.load(CONFIGS_DIR / "sampler" / "category_balance.yaml")
    category.merge_with_dotlist(["n_labels=2", "n_categories=2"])
    label2category = {label: label % 2 for label in range(10)}
    sampler = build(category, "sampler", labels=labels, label2category=label2category)
    assert isinstance(sampler, CategoryBalanceSampler) and sampler.batch_size == 2 * 2 * 4 and len(sampler) == 5
    with pytest.raises(ConfigError, match="needs a `category` column"):
        build(category, "sampler", labels=labels, label2category=None)
    category.merge_with_dotlist(["n_label=3"])
    with pytest.raises(ConfigError, match="unexpected keyword argument 'n_label'"):
        build(category, "sampler", labels=labels, label2category=label2category)
