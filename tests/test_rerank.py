"""k-reciprocal re-ranking (metriclab.evaluation.rerank) against hand-computed values and the dense reference
(tests/rerank_reference.py), and the embedding-level query expansions (metriclab.evaluation.expansion)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metriclab.evaluation import rerank
from metriclab.evaluation.expansion import alpha_query_expansion, average_query_expansion, database_augmentation
from metriclab.evaluation.rerank import KReciprocal, check_k_reciprocal
from tests.rerank_reference import rerank_dense_reference


def clustered(seed: int, n_query: int, n_gallery: int, dim: int, n_ids: int, noise: float = 0.6):
    """float32 features: identity centres (standard normal) plus noise; queries and gallery share the ids."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_ids, dim))
    q = centres[rng.integers(0, n_ids, n_query)] + noise * rng.normal(size=(n_query, dim))
    g = centres[rng.integers(0, n_ids, n_gallery)] + noise * rng.normal(size=(n_gallery, dim))
    return q.astype(np.float32), g.astype(np.float32)


def run(q: np.ndarray, g: np.ndarray, **kwargs) -> KReciprocal:
    return KReciprocal(torch.from_numpy(q), torch.from_numpy(g), **kwargs)


# ---------------------------------------------------------------------------------------------------- by hand

# 1-D features. Queries: item 0 at 0, item 1 at 10; gallery: items 2..6 at 1, 2.5, 11, 13, 6.
HAND_Q = np.array([[0.0], [10.0]], dtype=np.float32)
HAND_G = np.array([[1.0], [2.5], [11.0], [13.0], [6.0]], dtype=np.float32)
# Squared distances and ranked lists (ascending, equal distances in index order):
#   0: 0:0 2:1 3:6.25 6:36 1:100 4:121 5:169          max 169     list 0 2 3 6 1 4 5
#   1: 1:0 4:1 5:9 6:16 3:56.25 2:81 0:100            max 100     list 1 4 5 6 3 2 0
#   2: 2:0 0:1 3:2.25 6:25 1:81 4:100 5:144           max 144     list 2 0 3 6 1 4 5
#   3: 3:0 2:2.25 0:6.25 6:12.25 1:56.25 4:72.25 5:110.25  max 110.25  list 3 2 0 6 1 4 5
#   4: 4:0 1:1 5:4 6:25 3:72.25 2:100 0:121           max 121     list 4 1 5 6 3 2 0
#   5: 5:0 4:4 1:9 6:49 3:110.25 2:144 0:169          max 169     list 5 4 1 6 3 2 0
#   6: 6:0 3:12.25 1:16 2:25 4:25 0:36 5:49           max 49      list 6 3 1 2 4 0 5   (2 and 4 tie: 2 first)
# k1 = 2: F(i) = first 3 of the list: F0={0,2,3} F1={1,4,5} F2={2,0,3} F3={3,2,0} F4={4,1,5} F5={5,4,1}
#   F6={6,3,1}. R(i, 2) = {c in F(i): i in F(c)}: R0=R2=R3={0,2,3}; R1=R4=R5={1,4,5}; R6={6} (6 is neither in
#   F3 nor in F1).
# Expansion: h = round(2 / 2) = 1, F(c, 1) = first 2: R(0,1)={0,2} R(1,1)={1,4} R(2,1)={2,0} R(3,1)={3}
#   (2's first two are 2, 0) R(4,1)={4,1} R(5,1)={5} (4's first two are 4, 1) R(6,1)={6}. Each R(c, 1) of a
#   c in R(i, 2) lies inside R(i, 2) (e.g. i=0: {0,2}, {0,2}, {3}), so every R*(i) = R(i, 2).
HAND_RECIPROCAL = [[0, 2, 3], [1, 4, 5], [0, 2, 3], [0, 2, 3], [1, 4, 5], [1, 4, 5], [6]]
HAND_RANK_K1_4_ITEM6 = [6, 3, 1, 2, 4]  # item 6's first k1 + 1 = 5 with k1 = 4: the 2 / 4 tie in index order


def hand_v() -> np.ndarray:
    """V before local query expansion, written out: exp(-d / row max) over R*(i), normalised."""
    rows = {
        0: {0: 0.0, 2: 1 / 169, 3: 6.25 / 169},
        1: {1: 0.0, 4: 1 / 100, 5: 9 / 100},
        2: {0: 1 / 144, 2: 0.0, 3: 2.25 / 144},
        3: {0: 6.25 / 110.25, 2: 2.25 / 110.25, 3: 0.0},
        4: {1: 1 / 121, 4: 0.0, 5: 4 / 121},
        5: {1: 9 / 169, 4: 4 / 169, 5: 0.0},
        6: {6: 0.0},
    }
    v = np.zeros((7, 7))
    for i, row in rows.items():
        total = sum(math.exp(-x) for x in row.values())
        for j, x in row.items():
            v[i, j] = math.exp(-x) / total
    return v


def test_hand_case_sets_weights_and_final_values():
    kr = run(HAND_Q, HAND_G, k1=2, k2=2, lambda_value=0.3)
    for i, expected in enumerate(HAND_RECIPROCAL):
        recip, expansion = kr.k_reciprocal_sets(i)
        assert recip.tolist() == expected and expansion.tolist() == expected
    v = hand_v()
    for i in range(7):
        cols, weights = kr.encoding(i, expanded=False)
        np.testing.assert_allclose(weights, v[i, cols], rtol=0, atol=1e-12)
        assert cols.tolist() == np.nonzero(v[i])[0].tolist()
    # k2 = 2: V'(i) = (V(i) + V(second item of i's list)) / 2; second items: 0->2 1->4 2->0 3->2 4->1 5->4 6->3
    second = [2, 4, 0, 2, 1, 4, 3]
    v_qe = (v + v[second]) / 2
    for i in range(7):
        cols, weights = kr.encoding(i)
        np.testing.assert_allclose(weights, v_qe[i, cols], rtol=0, atol=1e-12)

    def jaccard(a: int, b: int) -> float:
        return 1 - np.minimum(v_qe[a], v_qe[b]).sum() / np.maximum(v_qe[a], v_qe[b]).sum()

    final = kr.block(0, 2)
    assert final.shape == (2, 5) and final.dtype == np.float32
    # V'(0) == V'(2) ((V0 + V2) / 2 both): Jaccard 0, only 0.3 x the normalised distance 1 / 169 is left
    assert final[0, 0] == pytest.approx(0.3 * 1 / 169, abs=1e-7)
    # disjoint supports ({0,2,3} vs {1,4,5}): Jaccard 1
    assert final[0, 2] == pytest.approx(0.7 + 0.3 * 121 / 169, abs=1e-7)
    assert final[0, 3] == pytest.approx(0.7 + 0.3 * 169 / 169, abs=1e-7)
    assert final[1, 0] == pytest.approx(0.7 + 0.3 * 81 / 100, abs=1e-7)
    assert final[1, 4] == pytest.approx(0.7 + 0.3 * 16 / 100, abs=1e-7)  # V'(6) on {0,2,3,6}, V'(1) on {1,4,5}
    assert final[1, 2] == pytest.approx(0.3 * 1 / 100, abs=1e-7)  # V'(1) == V'(4)
    # partial overlaps
    assert final[0, 1] == pytest.approx(0.7 * jaccard(0, 3) + 0.3 * 6.25 / 169, abs=1e-7)
    assert final[0, 4] == pytest.approx(0.7 * jaccard(0, 6) + 0.3 * 36 / 169, abs=1e-7)
    assert final[1, 3] == pytest.approx(0.7 * jaccard(1, 5) + 0.3 * 9 / 100, abs=1e-7)
    assert 0 < jaccard(0, 3) < 1 and 0 < jaccard(0, 6) < 1 and 0 < jaccard(1, 5) < 1
    np.testing.assert_allclose(final, rerank_dense_reference(HAND_Q, HAND_G, 2, 2, 0.3, v_dtype=np.float64),
                               rtol=0, atol=1e-7)


def test_equal_distances_rank_the_lower_index_first():
    kr = run(HAND_Q, HAND_G, k1=4, k2=1, lambda_value=0.3)
    assert kr.ranked_neighbours(6).tolist() == HAND_RANK_K1_4_ITEM6
    # with k2 = 7 > k1 + 1 the lists are k2 long (the whole list here)
    kr = run(HAND_Q, HAND_G, k1=2, k2=6, lambda_value=0.3)
    assert kr.ranked_neighbours(6).tolist() == [6, 3, 1, 2, 4, 0]


# ------------------------------------------------------------------------------------------- dense reference

CASES = [  # seed, Q, G, D, ids, k1, k2, lambda
    (0, 20, 100, 8, 10, 20, 6, 0.3),
    (1, 40, 200, 16, 15, 20, 6, 0.3),
    (2, 60, 300, 32, 25, 20, 6, 0.3),
    (3, 30, 150, 12, 12, 5, 1, 0.0),  # k2 = 1 (no local query expansion), lambda 0 (Jaccard only), h = round(2.5) = 2
    (4, 30, 150, 12, 12, 7, 3, 1.0),  # lambda 1: the normalised original distances
    (5, 25, 120, 10, 8, 12, 15, 0.5),  # k2 > k1 + 1
]


@pytest.mark.parametrize("case", CASES, ids=[f"seed{c[0]}-k1={c[5]}-k2={c[6]}-lam={c[7]}" for c in CASES])
def test_matches_the_float64_dense_reference(case):
    seed, n_q, n_g, dim, n_ids, k1, k2, lam = case
    q, g = clustered(seed, n_q, n_g, dim, n_ids)
    kr = run(q, g, k1=k1, k2=k2, lambda_value=lam)
    expected, parts = rerank_dense_reference(q, g, k1, k2, lam, v_dtype=np.float64, return_parts=True)
    got = kr.block(0, n_q)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    n = n_q + n_g
    grew = 0
    for i in range(n):
        recip, expansion = kr.k_reciprocal_sets(i)
        assert recip.tolist() == parts["reciprocal"][i].tolist()
        assert expansion.tolist() == parts["expansion"][i].tolist()
        grew += len(expansion) > len(recip)
        cols, weights = kr.encoding(i)
        np.testing.assert_allclose(weights, parts["v"][i, cols], rtol=0, atol=1e-12)
        assert np.count_nonzero(parts["v"][i]) == len(cols)
    if k1 >= 12:
        assert grew > 0  # the expansion step did add items somewhere
    np.testing.assert_allclose(kr.original(0, n_q), parts["original_dist"][:n_q, n_q:], rtol=0, atol=1e-7)
    if lam == 1.0:
        np.testing.assert_array_equal(got, kr.original(0, n_q))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_the_published_float16_reference(seed):
    # The published code keeps V, the Jaccard sums and distances in float16: sums of ~20 float16 terms near 1
    # (spacing 2^-11) and 1 - m / (2 - m) amplify that rounding where the Jaccard distance is small, so single
    # entries move by up to a few 1e-3 from the exact value (the float64 test above holds 1e-6); most stay < 1e-3.
    q, g = clustered(seed, 40, 200, 16, 15)
    got = run(q, g).block(0, 40)
    diff = np.abs(got - rerank_dense_reference(q, g, 20, 6, 0.3))
    assert np.median(diff) <= 5e-4
    assert np.quantile(diff, 0.95) <= 1e-3
    assert diff.max() <= 5e-3


def test_k1_as_large_as_possible():
    q, g = clustered(7, 10, 40, 8, 5)
    n = 50
    kr = run(q, g, k1=n - 1, k2=6, lambda_value=0.3)
    expected, parts = rerank_dense_reference(q, g, n - 1, 6, 0.3, v_dtype=np.float64, return_parts=True)
    np.testing.assert_allclose(kr.block(0, 10), expected, rtol=0, atol=1e-6)
    assert kr.k_reciprocal_sets(0)[0].tolist() == list(range(n))  # every list holds every item
    with pytest.raises(ValueError, match="k1"):
        run(q, g, k1=n)


def test_near_ties_from_duplicated_gallery_points():
    q, g = clustered(8, 30, 120, 12, 10)
    g = np.concatenate([g, g[:40], g[:10]])  # every one of the first 10 three times, the next 30 twice
    q[:5] = g[:5]  # queries equal to gallery points too
    kr = run(q, g, k1=15, k2=4, lambda_value=0.3)
    expected, parts = rerank_dense_reference(q, g, 15, 4, 0.3, v_dtype=np.float64, return_parts=True)
    np.testing.assert_allclose(kr.block(0, 30), expected, rtol=0, atol=1e-6)
    for i in range(len(q) + len(g)):
        assert kr.ranked_neighbours(i)[:16].tolist() == parts["initial_rank"][i, :16].tolist()
        assert kr.k_reciprocal_sets(i)[1].tolist() == parts["expansion"][i].tolist()


def test_rows_the_float32_bound_cannot_settle_are_redone(monkeypatch):
    # no extra candidates: every row with a candidate near the cut goes to the float64 pass, exact ties (the
    # duplicates) on to the full float64 rows; the result must not change
    monkeypatch.setattr(rerank, "EXTRA_CANDIDATES", 0)
    monkeypatch.setattr(rerank, "MAX_CANDIDATES", 1)
    q, g = clustered(9, 20, 100, 8, 10)
    g = np.concatenate([g, g[:30]])
    kr = run(q, g, k1=10, k2=3, lambda_value=0.3)
    assert kr.n_rows_float64 > 0 and kr.n_rows_full > 0
    expected = rerank_dense_reference(q, g, 10, 3, 0.3, v_dtype=np.float64)
    np.testing.assert_allclose(kr.block(0, 20), expected, rtol=0, atol=1e-6)


def test_blocks_of_any_size_give_identical_results():
    q, g = clustered(10, 37, 150, 16, 12)
    whole = run(q, g).block(0, 37)
    small = run(q, g, block_bytes=150 * 8 * 3)  # 3 rows per block inside; ranked lists 3 rows at a time too
    np.testing.assert_array_equal(small.block(0, 37), whole)
    parts = np.concatenate([small.block(lo, hi) for lo, hi in [(0, 1), (1, 11), (11, 11), (11, 37)]])
    np.testing.assert_array_equal(parts, whole)
    assert small.block(5, 5).shape == (0, 150)
    with pytest.raises(ValueError, match="query block"):
        small.block(0, 38)


def test_jaccard_as_min_over_max_equals_the_published_formula():
    q, g = clustered(11, 15, 60, 8, 6)
    kr = run(q, g, k1=10, k2=4, lambda_value=0.0)
    n = 75
    v = np.zeros((n, n))
    for i in range(n):
        cols, weights = kr.encoding(i)
        v[i, cols] = weights
    np.testing.assert_allclose(v.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # every row of V sums to 1
    sum_min = np.minimum(v[:15, None, :], v[None, 15:, :]).sum(axis=2)
    sum_max = np.maximum(v[:15, None, :], v[None, 15:, :]).sum(axis=2)
    np.testing.assert_allclose(1 - sum_min / sum_max, 1 - sum_min / (2 - sum_min), rtol=0, atol=1e-12)
    np.testing.assert_allclose(kr.block(0, 15), 1 - sum_min / sum_max, rtol=0, atol=1e-6)
    assert (kr.block(0, 15) == 1.0).any()  # pairs without a shared column: Jaccard 1


@pytest.mark.parametrize("kwargs, key", [
    (dict(k1=0), "k1"), (dict(k1=8), "k1"), (dict(k1=2.0), "k1"), (dict(k1=True), "k1"),
    (dict(k2=0), "k2"), (dict(k2=8), "k2"),
    (dict(lambda_value=-0.1), "lambda_value"), (dict(lambda_value=1.5), "lambda_value"),
    (dict(lambda_value=float("nan")), "lambda_value"),
])
def test_check_k_reciprocal_names_the_key(kwargs, key):
    args = dict(k1=2, k2=2, lambda_value=0.3) | kwargs
    with pytest.raises(ValueError, match=key) as info:
        check_k_reciprocal(8, **args)
    assert "\n" not in str(info.value)
    check_k_reciprocal(8, 7, 7, 1.0)  # the largest allowed values
    with pytest.raises(ValueError, match=key):
        KReciprocal(torch.zeros(3, 2), torch.zeros(5, 2), **args)


def test_bad_shapes():
    with pytest.raises(ValueError, match="at least one query"):
        KReciprocal(torch.zeros(0, 2), torch.zeros(5, 2), k1=2, k2=2)
    with pytest.raises(ValueError, match=r"\[Q, D\]"):
        KReciprocal(torch.zeros(3, 2), torch.zeros(5, 3), k1=2, k2=2)


# ------------------------------------------------------------------------------------------ query expansion

S = 1 / math.sqrt(2)
# q = (1, 1): unit (s, s), s = 1/sqrt(2). Gallery g0 = (3, 4) -> (0.6, 0.8), g1 = (0, 2) -> (0, 1),
# g2 = (5, 0) -> (1, 0), g3 = (-1, 0). Cosine similarities with q: g0 1.4 s = 0.98995, g1 s, g2 s, g3 -s;
# g1 and g2 tie: the lower index (g1) ranks first.
QE_Q = torch.tensor([[1.0, 1.0]])
QE_G = torch.tensor([[3.0, 4.0], [0.0, 2.0], [5.0, 0.0], [-1.0, 0.0]])


def unit(*xs: float) -> list[float]:
    n = math.sqrt(sum(x * x for x in xs))
    return [x / n for x in xs]


def test_average_query_expansion_by_hand():
    # k = 2: mean of (s, s), (0.6, 0.8), (0, 1) -> direction (s + 0.6, s + 1.8)
    got = average_query_expansion(QE_Q, QE_G, 2)
    assert got[0].tolist() == pytest.approx(unit(S + 0.6, S + 1.8), abs=1e-6)
    # k = 1: (s + 0.6, s + 0.8)
    assert average_query_expansion(QE_Q, QE_G, 1)[0].tolist() == pytest.approx(unit(S + 0.6, S + 0.8), abs=1e-6)
    assert torch.linalg.norm(got, dim=1).tolist() == pytest.approx([1.0], abs=1e-6)


def test_alpha_query_expansion_by_hand():
    # k = 4, alpha = 3: weights (1.4 s)^3, s^3, s^3 and max(-s, 0)^3 = 0
    w0, w1 = (1.4 * S) ** 3, S ** 3
    expected = unit(S + w0 * 0.6 + w1 * 1.0, S + w0 * 0.8 + w1 * 1.0)
    got = alpha_query_expansion(QE_Q, QE_G, 4, 3.0)
    assert got[0].tolist() == pytest.approx(expected, abs=1e-6)
    # alpha = 0: every neighbour weighs 1 (AQE)
    torch.testing.assert_close(alpha_query_expansion(QE_Q, QE_G, 2, 0.0), average_query_expansion(QE_Q, QE_G, 2))


def test_database_augmentation_by_hand():
    # similarities among the unit gallery items: g0.g1 = 0.8, g0.g2 = 0.6, g0.g3 = -0.6, g1.g2 = 0, g1.g3 = 0,
    # g2.g3 = -1. Top-1 other item: g0 -> g1, g1 -> g0, g2 -> g0, g3 -> g1 (0 beats -0.6 and -1).
    got = database_augmentation(QE_G, 1)  # alpha 0: plain mean of the item and its neighbour
    expected = [unit(0.6, 1.8), unit(0.6, 1.8), unit(1.6, 0.8), unit(-1.0, 1.0)]
    for row, exp in zip(got.tolist(), expected):
        assert row == pytest.approx(exp, abs=1e-6)
    # k = 2, alpha = 1: g0 + 0.8 g1 + 0.6 g2 = (1.2, 1.6) -> (0.6, 0.8); g3's neighbours g1 (0), g0 (-0.6) weigh 0
    got = database_augmentation(QE_G, 2, alpha=1.0)
    assert got[0].tolist() == pytest.approx([0.6, 0.8], abs=1e-6)
    assert got[3].tolist() == pytest.approx([-1.0, 0.0], abs=1e-6)
    # g1: neighbours g0 (0.8) and, of g2 / g3 tied at 0, g2 (lower index) with weight 0: (0.48, 1.64)
    assert got[1].tolist() == pytest.approx(unit(0.48, 1.64), abs=1e-6)


def test_equal_similarities_take_the_lower_index_even_beyond_the_fetched_candidates():
    # 12 gallery items alternating (1, 1) and (1, -1): all at cosine s from q = (1, 0), more ties than the
    # candidates fetched (k + 8): the top-3 must be items 0, 1, 2 -> (1,1) + (1,-1) + (1,1) in unit form
    g = torch.tensor([[1.0, 1.0], [1.0, -1.0]] * 6)
    got = average_query_expansion(torch.tensor([[1.0, 0.0]]), g, 3, block_bytes=8)
    assert got[0].tolist() == pytest.approx(unit(1 + 3 * S, S), abs=1e-6)


def test_blocked_expansion_equals_one_block():
    rng = np.random.default_rng(0)
    q, g = torch.from_numpy(rng.normal(size=(33, 6)).astype(np.float32)), torch.from_numpy(
        rng.normal(size=(50, 6)).astype(np.float32))
    torch.testing.assert_close(alpha_query_expansion(q, g, 5, 3.0, block_bytes=4 * 50 * 4),
                               alpha_query_expansion(q, g, 5, 3.0))
    torch.testing.assert_close(database_augmentation(g, 4, 2.0, block_bytes=4 * 50 * 4),
                               database_augmentation(g, 4, 2.0))


@pytest.mark.parametrize("call, key", [
    (lambda: average_query_expansion(QE_Q, QE_G, 0), "k"),
    (lambda: average_query_expansion(QE_Q, QE_G, 5), "k"),
    (lambda: average_query_expansion(QE_Q, QE_G, 2.5), "k"),
    (lambda: alpha_query_expansion(QE_Q, QE_G, 2, -1.0), "alpha"),
    (lambda: alpha_query_expansion(QE_Q, QE_G, 2, float("inf")), "alpha"),
    (lambda: database_augmentation(QE_G, 4), "k"),
    (lambda: database_augmentation(QE_G, 0), "k"),
    (lambda: database_augmentation(QE_G, 2, alpha=-0.5), "alpha"),
    (lambda: database_augmentation(QE_G[:1], 1), "gallery of at least 2 items"),
    (lambda: average_query_expansion(QE_Q, QE_G[:1], 1), "gallery of at least 2 items"),
])
def test_expansion_validation_names_the_key(call, key):
    with pytest.raises(ValueError, match=key) as info:
        call()
    assert "\n" not in str(info.value)
    average_query_expansion(QE_Q, QE_G, 4)  # k = G is allowed for queries, k = G - 1 for DBA
    database_augmentation(QE_G, 3)
