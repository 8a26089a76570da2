"""The exact engine under near-ties: distinct distances whose float32 ranking keys round to equal (or swapped)
values are ranked by their exact order; exactly equal distances stay pessimistic ties."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from metriclab.evaluation.engine import RetrievalSide, RetrievalSpec, evaluate_retrieval

torch.set_num_threads(1)


def run(q, g, q_lab, g_lab, **spec):
    return evaluate_retrieval(RetrievalSide(q, q_lab), RetrievalSide(g, g_lab), RetrievalSpec(**spec))


def reference(q: np.ndarray, g: np.ndarray, q_lab: np.ndarray, g_lab: np.ndarray, ks=(1, 5)) -> dict:
    """cmc@k, mAP, mINP in float64 from the (float32) embeddings, one query at a time, ties pessimistic."""
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    cmc = {k: [] for k in ks}
    ap, inp = [], []
    for i in range(len(q64)):
        d = ((g64 - q64[i]) ** 2).sum(1)
        true = g_lab == q_lab[i]
        order = np.lexsort((true, d))  # by distance; wrong before true in a tie
        ranks = np.flatnonzero(true[order]) + 1
        for k in ks:
            cmc[k].append(ranks[0] <= k)
        ap.append(np.mean(np.arange(1, len(ranks) + 1) / ranks))
        inp.append(len(ranks) / ranks[-1])
    out = {f"cmc@{k}": float(np.mean(v)) for k, v in cmc.items()}
    out.update({"mAP": float(np.mean(ap)), "mINP": float(np.mean(inp))})
    return out


def test_nearer_item_first_although_float32_keys_tie():
    report = run(np.array([[10.0]]), np.array([[10.0001], [10.0002]]), [1], [1, 2])
    assert report.metrics["cmc@1"] == 1.0
    assert report.metrics["mAP"] == 1.0
    assert report.metrics["mINP"] == 1.0
    assert report.per_query["first_hit_rank"].tolist() == [1]
    assert report.topk_ids[0, :2].tolist() == [0, 1]
    # distances from the exact computation: 10.0001 and 10.0002 as float32 less 10.0
    expected = np.abs(np.float32([10.0001, 10.0002]).astype(np.float64) - np.float32(10.0))
    np.testing.assert_allclose(report.topk_distances[0, :2], expected, rtol=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_large_offset_embeddings_match_float64_reference(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g, dim, n_ids = 60, 400, 8, 12
    g_lab = rng.integers(0, n_ids, n_g)
    q_lab = rng.integers(0, n_ids, n_q)
    centres = rng.normal(size=(n_ids, dim))
    g = (1e4 + centres[g_lab] + 0.7 * rng.normal(size=(n_g, dim))).astype(np.float32)
    q = (1e4 + centres[q_lab] + 0.7 * rng.normal(size=(n_q, dim))).astype(np.float32)
    got = run(q, g, q_lab, g_lab, cmc_top_k=(1, 5), block_size=16).metrics
    want = reference(q, g, q_lab, g_lab)
    for name, value in want.items():
        assert got[name] == pytest.approx(value, abs=1e-12), name


def test_large_offset_topk_is_the_exact_order_with_exact_distances():
    rng = np.random.default_rng(3)
    g = (1e4 + rng.normal(size=(300, 4))).astype(np.float32)
    q = (1e4 + rng.normal(size=(5, 4))).astype(np.float32)
    report = run(q, g, np.zeros(5), rng.integers(0, 3, 300), keep_top_k=20)
    d = np.sqrt(((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(2))
    np.testing.assert_array_equal(report.topk_ids, np.argsort(d, axis=1, kind="stable")[:, :20])
    np.testing.assert_allclose(report.topk_distances, np.sort(d, axis=1)[:, :20], rtol=1e-6)


def test_exact_ties_stay_pessimistic_also_far_from_the_origin():
    # both gallery items sit at exactly the same distance (the same point): the wrong one counts first
    q = np.array([[1e4, 1e4]], dtype=np.float32)
    g = np.array([[1e4 + 1, 1e4], [1e4 + 1, 1e4], [1e4 + 3, 1e4]], dtype=np.float32)
    report = run(q, g, [1], [1, 2, 1], keep_top_k=3)
    assert report.metrics["cmc@1"] == 0.0
    assert report.metrics["mAP"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert report.topk_ids[0].tolist() == [1, 0, 2]
    # a mirror image is at exactly the same distance too, and so is every item of a collapsed model
    mirror = run(np.zeros((1, 2)), np.array([[1.0, 0.0], [-1.0, 0.0]]), [1], [1, 2])
    assert mirror.metrics["cmc@1"] == 0.0
    collapsed = run(np.full((3, 4), 7.0), np.full((6, 4), 7.0), [0, 1, 2], [0, 1, 2, 0, 1, 2])
    assert collapsed.metrics["cmc@1"] == 0.0
    assert collapsed.metrics["mAP"] == pytest.approx((1 / 5 + 2 / 6) / 2)  # ranks 5 and 6


def test_cosine_near_ties_follow_the_exact_order():
    # directions 1e-4 and 2e-4 rad away from the query: 1 - cos rounds to 0 in float32 for both
    q = np.array([[1.0, 0.0]])
    g = np.array([[np.cos(2e-4), np.sin(2e-4)], [np.cos(1e-4), np.sin(1e-4)]])
    report = run(q, g, [1], [2, 1], distance="cosine")
    assert report.metrics["cmc@1"] == 1.0
    assert report.topk_ids[0, :2].tolist() == [1, 0]


def oml_cmc_sample(seed: int, error_rate: float) -> tuple[np.ndarray, ...]:
    """The data of OML's ``test_cmc_score_with_samples`` (tests/test_oml/test_metrics/test_cmc_metrics.py) for one
    error rate, seeded: 2-4 well-separated 1-D clusters (uniform in [2i, 2i + 0.2]), 500-999 queries and 250-499
    gallery items per cluster, each gallery label changed to another one with probability `error_rate`."""
    rng = np.random.RandomState(seed)
    n_labels, kq, kg = rng.randint(2, 5), rng.randint(500, 1000), rng.randint(250, 500)

    def samples(per_label: int) -> tuple[np.ndarray, np.ndarray]:
        x = np.concatenate([rng.uniform(2 * i, 2 * i + 0.2, per_label) for i in range(n_labels)])
        return x.reshape(-1, 1).astype(np.float32), np.repeat(np.arange(n_labels), per_label)

    q, q_lab = samples(kq)
    g, g_lab = samples(kg)
    for i in range(len(g_lab)):
        if rng.binomial(1, error_rate):
            g_lab[i] = rng.choice([lab for lab in range(n_labels) if lab != g_lab[i]])
    return q, q_lab, g, g_lab


@pytest.mark.parametrize("error_rate", [0.05, 0.1, 0.15, 0.2, 0.25])
def test_oml_cmc_with_samples_cases_are_exact(error_rate):
    q, q_lab, g, g_lab = oml_cmc_sample(int(error_rate * 100), error_rate)
    d = np.abs(q.astype(np.float64) - g.astype(np.float64).T)
    true = q_lab[:, None] == g_lab[None, :]
    # the first item is a true match when the nearest true match is strictly nearer than every wrong item
    exact_cmc1 = float(np.mean(np.where(true, d, np.inf).min(1) < np.where(true, np.inf, d).min(1)))
    got = run(q, g, q_lab, g_lab, cmc_top_k=(1,)).metrics["cmc@1"]
    assert got == exact_cmc1
    assert abs(got - (1 - error_rate)) <= 0.05  # OML's own check, on the exact value


def test_order_keys_orders_and_ties_like_the_floats():
    from metriclab.evaluation.exact import order_keys

    rng = np.random.default_rng(5)
    special = np.float32([0.0, -0.0, np.inf, -np.inf, 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
    values = np.concatenate([special, rng.normal(scale=1e3, size=2000).astype(np.float32),
                             rng.choice(special, 500)])
    mapped = order_keys(values)
    assert mapped.dtype == np.int32
    # the same order and the same ties: -0.0 and +0.0 are one value, as for floats
    np.testing.assert_array_equal(np.argsort(mapped, kind="stable"), np.argsort(values, kind="stable"))
    np.testing.assert_array_equal(mapped[:, None] == mapped[None, :], values[:, None] == values[None, :])


def test_sorted_block_counts_and_runs_equal_brute_force():
    from metriclab.evaluation.exact import SortedBlock

    rng = np.random.default_rng(6)
    key = rng.integers(-20, 20, size=(7, 50)).astype(np.float32) / 4  # many equal keys
    key[rng.random(key.shape) < 0.1] = np.inf  # excluded items
    buffer = np.empty((9, 50), dtype=np.int64)
    block = SortedBlock(key, buffer)
    rows = np.repeat(np.arange(7), 6)
    values = rng.integers(-24, 24, size=len(rows)).astype(np.float32) / 4
    want = (key[rows] <= values[:, None]).sum(1)
    np.testing.assert_array_equal(block.count_le(rows, values), want)
    # a run of sorted positions holds the items of that key range, each with its own gallery index
    lo, hi = values - 1, values + 1
    start, end = block.count_le(rows, lo), block.count_le(rows, hi)
    got_rows, got_cols = block.runs(rows, start, end)
    at = 0
    for r, a, b, s, e in zip(rows, lo, hi, start, end):
        cols = got_cols[at : at + e - s]
        at += e - s
        assert (got_rows[at - (e - s) : at] == r).all()
        np.testing.assert_array_equal(np.sort(cols), np.flatnonzero((key[r] > a) & (key[r] <= b)))
    # within a run, equal keys come in gallery-index order
    first = block.cols(np.arange(7), np.zeros(7, dtype=np.int64))
    np.testing.assert_array_equal(first, np.lexsort((np.arange(50)[None].repeat(7, 0), key), axis=1)[:, 0])


@pytest.mark.parametrize("block_size", [3, None])
def test_grid_embeddings_full_of_ties_and_near_ties_match_float64_reference(block_size):
    # coordinates on a coarse grid far from the origin: many exactly equal distances (pessimistic ties) next to
    # distances that differ by less than float32 can tell at this offset, with windows overlapping in every row
    rng = np.random.default_rng(7)
    n_q, n_g, dim = 40, 300, 3
    g = (3e3 + rng.integers(0, 4, size=(n_g, dim)) + 1e-3 * rng.integers(0, 2, size=(n_g, dim))).astype(np.float32)
    q = (3e3 + rng.integers(0, 4, size=(n_q, dim))).astype(np.float32)
    g_lab, q_lab = rng.integers(0, 5, n_g), rng.integers(0, 5, n_q)
    report = run(q, g, q_lab, g_lab, cmc_top_k=(1, 5), block_size=block_size, keep_top_k=15)
    want = reference(q, g, q_lab, g_lab)
    for name, value in want.items():
        assert report.metrics[name] == pytest.approx(value, abs=1e-12), name
    d = ((q.astype(np.float64)[:, None] - g.astype(np.float64)[None]) ** 2).sum(2)
    true = q_lab[:, None] == g_lab[None]
    order = np.array([np.lexsort((np.arange(n_g), true[i], d[i])) for i in range(n_q)])[:, :15]
    np.testing.assert_array_equal(report.topk_ids, order)


@pytest.mark.parametrize("threads", [2, 3])
def test_rows_split_across_threads_give_the_same_report(threads):
    # the engine splits each block's rows across torch.get_num_threads() worker threads after the matrix product
    rng = np.random.default_rng(8)
    g = (3e3 + rng.integers(0, 4, size=(300, 3)) + 1e-3 * rng.integers(0, 2, size=(300, 3))).astype(np.float32)
    q = (3e3 + rng.integers(0, 4, size=(41, 3))).astype(np.float32)
    g_lab, q_lab = rng.integers(0, 5, 300), rng.integers(0, 5, 41)
    one = run(q, g, q_lab, g_lab, cmc_top_k=(1, 5), block_size=7, keep_top_k=15)
    torch.set_num_threads(threads)
    try:
        split = run(q, g, q_lab, g_lab, cmc_top_k=(1, 5), block_size=7, keep_top_k=15)
    finally:
        torch.set_num_threads(1)
    assert split.metrics == one.metrics
    np.testing.assert_array_equal(split.topk_ids, one.topk_ids)
    np.testing.assert_array_equal(split.topk_distances, one.topk_distances)
    np.testing.assert_array_equal(split.per_query.to_numpy(), one.per_query.to_numpy())
    assert split.metrics["mAP"] == pytest.approx(reference(q, g, q_lab, g_lab)["mAP"], abs=1e-12)
