"""MAP@R and R-precision (pytorch-metric-learning's definitions, R = the query's number of true matches after
exclusions) from the engine: hand-computed cases, and pytorch-metric-learning's AccuracyCalculator on random ones."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from metriclab.evaluation.engine import RetrievalSide, RetrievalSpec, evaluate_retrieval

torch.set_num_threads(1)


def test_hand_computed_ranking():
    # one query at 0; gallery distances 1, 2, 3, 4, 5 with labels T F T F T: R = 3, ranks of the true matches 1, 3, 5
    q = np.zeros((1, 1), np.float32)
    g = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    report = evaluate_retrieval(RetrievalSide(q, [7]), RetrievalSide(g, [7, 1, 7, 2, 7]), RetrievalSpec())
    # within the first R = 3: true matches at 1 and 3 -> R-precision 2/3; MAP@R = (1/1 + 2/3) / 3
    assert report.metrics["r_precision"] == pytest.approx(2 / 3)
    assert report.metrics["map@r"] == pytest.approx((1 + 2 / 3) / 3)


def test_exclusions_shrink_r():
    # the same, but the true match at distance 1 shares the query's sequence: excluded, R = 2, ranks 2 and 4
    q = np.zeros((1, 1), np.float32)
    g = np.array([[1.0], [2.0], [3.0], [4.0], [5.0]], np.float32)
    report = evaluate_retrieval(RetrievalSide(q, [7], sequences=["s"]),
                                RetrievalSide(g, [7, 1, 7, 2, 7], sequences=["s", "a", "b", "c", "d"]),
                                RetrievalSpec())
    assert report.metrics["r_precision"] == pytest.approx(1 / 2)  # within the first 2: one true match (rank 2)
    assert report.metrics["map@r"] == pytest.approx((1 / 2) / 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equal_to_pytorch_metric_learning(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g, dim, n_ids = 80, 400, 16, 12
    centres = rng.normal(size=(n_ids, dim))
    q_lab, g_lab = rng.integers(0, n_ids, n_q), rng.integers(0, n_ids, n_g)
    q = (centres[q_lab] + 1.2 * rng.normal(size=(n_q, dim))).astype(np.float32)
    g = (centres[g_lab] + 1.2 * rng.normal(size=(n_g, dim))).astype(np.float32)
    ours = evaluate_retrieval(RetrievalSide(q, q_lab), RetrievalSide(g, g_lab), RetrievalSpec()).metrics
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"), k="max_bin_count",
                              device=torch.device("cpu"))
    theirs = calc.get_accuracy(torch.from_numpy(q), torch.from_numpy(q_lab), torch.from_numpy(g),
                               torch.from_numpy(g_lab), ref_includes_query=False)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)


def test_every_item_query_and_gallery_equals_pytorch_metric_learning_ref_includes_query():
    # the metric-learning protocol (SOP, CUB): each item is a query against all the others
    rng = np.random.default_rng(3)
    n, dim, n_ids = 300, 16, 20
    lab = rng.integers(0, n_ids, n)
    x = (rng.normal(size=(n_ids, dim))[lab] + 1.0 * rng.normal(size=(n, dim))).astype(np.float32)
    ids = np.arange(n)
    ours = evaluate_retrieval(RetrievalSide(x, lab, ids=ids), RetrievalSide(x, lab, ids=ids), RetrievalSpec()).metrics
    calc = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision"), k="max_bin_count",
                              device=torch.device("cpu"))
    t, tl = torch.from_numpy(x), torch.from_numpy(lab)
    theirs = calc.get_accuracy(t, tl, t, tl, ref_includes_query=True)
    assert ours["map@r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
