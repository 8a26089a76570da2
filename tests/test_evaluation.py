"""metriclab.data's ValidationData and metriclab.evaluation's validation pass, without training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metriclab.data import build_validation_data, read_dataset_csv
from metriclab.evaluation import evaluate_validation
from metriclab.paths import REPO_ROOT
from metriclab.retrieval_metrics import evaluate_retrieval
from tests.conftest import write_tiny_dataset


def _eval_cfg(**overrides):
    cfg = OmegaConf.load(Path(REPO_ROOT) / "configs" / "evaluation" / "default.yaml")
    return OmegaConf.merge(cfg, overrides)


@pytest.fixture
def seq_data(tmp_path):
    """The tiny dataset with a `sequence` column: two sequences per label, and some cells left empty."""
    root = tmp_path / "data"
    df = write_tiny_dataset(root)
    seq = [f"{label}_{i % 2}" for i, label in enumerate(df["label"])]
    val_rows = np.flatnonzero(df["split"] == "validation")
    for r in val_rows[[0, 1, 7, 12, 13]]:  # empty cells: must group with nothing (not even with each other)
        seq[r] = None
    df["sequence"] = seq
    df.to_csv(root / "dataset.csv", index=False)
    return build_validation_data(read_dataset_csv(root), root, None)


def test_empty_sequence_cells_exclude_nothing_and_metrics_match_unique_names(seq_data):
    data = seq_data
    assert data.sequences is data.sequences  # computed once, not per access
    assert data.labels is data.labels and data.is_query is data.is_query
    emb = torch.from_numpy(np.random.default_rng(0).normal(size=(len(data.df), 8)).astype(np.float32))
    report = evaluate_validation(emb, data, _eval_cfg())
    # the rule, spelled out: an empty sequence is a sequence of its own
    raw = data.df["sequence"].astype(object)
    seq = np.array([f"__own{i}" if v is None or v != v else str(v) for i, v in enumerate(raw)], dtype=object)
    assert raw.isna().sum() == 5
    q, g = np.flatnonzero(data.is_query), np.flatnonzero(data.is_gallery)
    cfg = _eval_cfg()
    expected = evaluate_retrieval(
        emb[q], emb[g], data.labels[q], data.labels[g], query_ids=q, gallery_ids=g,
        query_sequences=seq[q], gallery_sequences=seq[g], query_categories=data.categories[q],
        cmc_top_k=tuple(cfg.cmc_top_k), map_top_k=tuple(cfg.map_top_k), precision_top_k=tuple(cfg.precision_top_k),
        knn_top_k=tuple(cfg.knn_top_k), pcf_variance=tuple(cfg.pcf_variance), keep_top_k=int(cfg.grid_top_k))
    assert report.metrics == pytest.approx(expected.metrics, nan_ok=True)
    assert (report.per_query["n_true"].to_numpy() == expected.per_query["n_true"].to_numpy()).all()
    np.testing.assert_array_equal(report.topk_ids, expected.topk_ids)
