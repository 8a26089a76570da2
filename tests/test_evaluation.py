"""metriclab.data.datasets's ValidationData, metriclab.evaluation.validation's metrics and the pictures drawn from
them (metriclab.evaluation.pictures), without training."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.data.datasets import build_validation_data, read_dataset_csv
from metriclab.evaluation.engine import RetrievalSide, RetrievalSpec, evaluate_retrieval
from metriclab.evaluation.validation import evaluate_validation
from tests.helpers import write_tiny_dataset


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
        RetrievalSide(emb[q], data.labels[q], ids=q, sequences=seq[q], categories=data.categories[q]),
        RetrievalSide(emb[g], data.labels[g], ids=g, sequences=seq[g]),
        RetrievalSpec(cmc_top_k=tuple(cfg.cmc_top_k), map_top_k=tuple(cfg.map_top_k),
                      precision_top_k=tuple(cfg.precision_top_k), knn_top_k=tuple(cfg.knn_top_k),
                      pcf_variance=tuple(cfg.pcf_variance), keep_top_k=int(cfg.grid_top_k)))
    # the ranking metrics; validation adds the verification ones (tests/test_verification.py)
    assert set(report.metrics) - set(expected.metrics) == set(report.verification.metrics)
    assert {k: report.metrics[k] for k in expected.metrics} == pytest.approx(expected.metrics, nan_ok=True)
    assert (report.per_query["n_true"].to_numpy() == expected.per_query["n_true"].to_numpy()).all()
    np.testing.assert_array_equal(report.topk_ids, expected.topk_ids)


def _drawn_texts(monkeypatch, report, data, emb, tmp_path):
    """(suptitle, query tile titles, worst) of the worst-query grid, captured instead of saved."""
    import metriclab.evaluation.pictures as evaluation

    figures = []
    monkeypatch.setattr(evaluation, "atomic_savefig", lambda fig, path, dpi=80: figures.append(fig))
    worst = evaluation.draw_worst_queries(report, data, emb, tmp_path / "grid.png", 5, 2, "t")
    assert worst.equals(evaluation.select_worst_queries(report, 5)) and len(figures) == 1
    fig = figures[0]
    rows = np.array(fig.axes).reshape(len(worst), -1)  # subplots are created row by row
    return fig.get_suptitle(), [row[0].get_title() for row in rows], worst


@pytest.mark.parametrize("backend", ["exact", "faiss-flat"])
def test_worst_query_grid_states_the_rule_it_selected_by(seq_data, monkeypatch, tmp_path, backend):
    if backend != "exact":
        pytest.importorskip("faiss")
    data = seq_data
    emb = torch.from_numpy(np.random.default_rng(1).normal(size=(len(data.df), 8)).astype(np.float32))
    report = evaluate_validation(emb, data, _eval_cfg(backend=backend))
    suptitle, queries, worst = _drawn_texts(monkeypatch, report, data, emb, tmp_path)
    rank_key = worst["first_hit_rank"].where(worst["first_hit_rank"] > 0, np.iinfo(np.int64).max).to_numpy()
    if backend == "exact":
        assert "5 worst queries by AP (lowest AP first; ties: later first true match). Green = right" in suptitle
        assert (np.diff(worst["ap"].to_numpy()) >= 0).all()
        assert all(f"\nAP {ap:.3f}, 1st hit " in t for t, ap in zip(queries, worst["ap"]))
    else:
        assert worst["ap"].isna().all()  # faiss gives no AP: the grid must not claim to sort by it
        assert "by AP" not in suptitle and "5 worst queries by first-hit rank" in suptitle
        assert "faiss-flat gives no AP" in suptitle
        assert (np.diff(rank_key) <= 0).all()
        assert not any("AP" in t or "nan" in t for t in queries)
        assert all("1st hit " in t for t in queries)


def test_class_names_prefer_the_class_name_column():
    import pandas as pd

    from metriclab.data.datasets import class_names

    df = pd.DataFrame({"label": [3, 10], "path": ["a", "b"]})
    assert class_names(df).tolist() == ["3", "10"]
    assert class_names(df.assign(class_name=["apple", 7])).tolist() == ["apple", "7"]



def test_validation_takes_the_built_group_or_its_config_node(seq_data, tmp_path):
    """The built `EvaluationConfig`, the DictConfig and a plain dict give the same report and the same files; a
    misspelt key in the node is an error naming it, not ignored."""
    from metriclab.evaluation.pictures import save_worst_queries

    data = seq_data
    emb = torch.from_numpy(np.random.default_rng(2).normal(size=(len(data.df), 8)).astype(np.float32))
    node = _eval_cfg(cmc_top_k=[1, 2], knn_top_k=[1, 3], grid_top_k=3, worst_queries=2, grid_missed=1)
    built = build(node, "evaluation")
    reports = [evaluate_validation(emb, data, c) for c in (built, node, OmegaConf.to_container(node))]
    for other in reports[1:]:
        assert other.metrics == reports[0].metrics
        assert other.per_query.equals(reports[0].per_query)
        np.testing.assert_array_equal(other.topk_ids, reports[0].topk_ids)
    assert {"cmc@1", "cmc@2", "knn_accuracy@3"} <= set(reports[0].metrics) and "cmc@5" not in reports[0].metrics
    assert reports[0].topk_ids.shape == (int(data.is_query.sum()), 3)  # grid_top_k neighbours kept
    tables = []
    for name, c in (("built", built), ("node", node)):
        files = save_worst_queries(reports[0], data, emb, tmp_path / name, c, title="t")
        assert [f.name for f in files] == ["worst_queries.png", "worst_queries.csv"]
        tables.append(pd.read_csv(files[1]))
    assert len(tables[0]) == 2 and tables[0].equals(tables[1])  # worst_queries=2 rows
    with pytest.raises(ConfigError, match="`evaluation.cmc_topk` is not a key of `evaluation`"):
        evaluate_validation(emb, data, OmegaConf.merge(node, {"cmc_topk": [1]}))
    with pytest.raises(ConfigError, match="`evaluation.grid_mised` is not a key of `evaluation`"):
        save_worst_queries(reports[0], data, emb, tmp_path / "bad", {"grid_mised": 1})

