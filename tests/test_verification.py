"""Verification metrics (metriclab.evaluation.verification): values derived by hand, a brute-force reference, OML's
FNMR@FMR where the definitions coincide, the blocked computation over embeddings against a dense reference, and the
pictures."""
from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch

import metriclab.evaluation.verification as verification
from metriclab.evaluation.blocks import Pairs, plan_blocks
from metriclab.evaluation.inputs import check_inputs
from metriclab.evaluation.spec import RetrievalSide
from metriclab.evaluation.verification import (
    BlockDistances,
    check_fmr_vals,
    count_limit,
    threshold_at_fmr,
    verification_from_distances,
    verification_metrics,
)
from metriclab.evaluation.verification_pictures import distance_histograms_figure, roc_figure

F32_INF = np.float32(-np.inf)


def below32(v: float) -> float:
    return float(np.nextafter(np.float32(v), F32_INF))


# --- hand-made sets ------------------------------------------------------------------------------------------


def test_hand_set_with_ties():
    pos = np.array([0.1, 0.2, 0.2, 0.5])
    neg = np.array([0.2, 0.3, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1])  # n_neg = 10
    r = verification_from_distances(pos, neg, fmr_vals=(0.1, 0.2, 0.3, 0.05))
    m = r.metrics
    assert (r.n_pos_pairs, r.n_neg_pairs) == (4, 10)
    # FMR at the distinct negatives: 0.2 -> 1/10, 0.3 -> 3/10 (tie of two), 0.4 -> 4/10, ...
    # x = 0.1: 0.2 has FMR 0.1 <= 0.1 -> t = 0.2; positives > 0.2: {0.5} -> FNMR 1/4
    assert m["threshold@fmr_0.1"] == 0.2 and m["fnmr@fmr_0.1"] == 0.25
    # x = 0.2: 0.3 would be FMR 0.3 (the tie is not split) -> still t = 0.2, FNMR 1/4, FMR reached 0.1
    assert m["threshold@fmr_0.2"] == 0.2 and m["fnmr@fmr_0.2"] == 0.25
    assert r.operating_points[0.2] == (0.1, 0.25)
    # x = 0.3: t = 0.3 (FMR 3/10); positives > 0.3: {0.5} -> 1/4
    assert m["threshold@fmr_0.3"] == 0.3 and m["fnmr@fmr_0.3"] == 0.25
    # x = 0.05 < 1/10: no negative may be accepted -> t just below 0.2; positives > t: 0.2, 0.2, 0.5 -> 3/4
    assert m["threshold@fmr_0.05"] == float(np.nextafter(0.2, -np.inf)) and m["fnmr@fmr_0.05"] == 0.75
    # EER: t=-inf: max(0, 1) = 1; t=0.1: max(0, 3/4); t=0.2: max(1/10, 1/4) = 0.25; t=0.3: max(3/10, 1/4) = 0.3;
    # later ones have FMR >= 0.4. Min 0.25 at t = 0.2 (FMR and FNMR never meet here).
    assert m["eer"] == 0.25 and m["eer_threshold"] == 0.2
    assert threshold_at_fmr(r, 0.3) == 0.3
    with pytest.raises(ValueError, match="not computed"):
        threshold_at_fmr(r, 0.5)
    assert list(m) == ["fnmr@fmr_0.1", "fnmr@fmr_0.2", "fnmr@fmr_0.3", "fnmr@fmr_0.05",
                       "threshold@fmr_0.1", "threshold@fmr_0.2", "threshold@fmr_0.3", "threshold@fmr_0.05",
                       "eer", "eer_threshold"]


def test_eer_at_an_exact_crossing():
    pos = np.array([0.1, 0.2, 0.3, 0.6], dtype=np.float32)
    neg = np.array([0.25, 0.4, 0.5, 0.7], dtype=np.float32)
    m = verification_from_distances(pos, neg, (0.25,)).metrics
    # t=0.2: FMR 0, FNMR 2/4; t=0.25: FMR 1/4, FNMR 2/4; t=0.3: FMR 1/4, FNMR 1/4 (they meet); t=0.4: FMR 2/4
    assert m["eer"] == 0.25 and m["eer_threshold"] == np.float32(0.3)
    # x = 0.25: t = 0.25 (FMR 1/4); positives > 0.25: 0.3, 0.6 -> 1/2
    assert m["threshold@fmr_0.25"] == np.float32(0.25) and m["fnmr@fmr_0.25"] == 0.5


def test_eer_extremes():
    # perfect separation: t = 1 accepts both positives and no negative
    m = verification_from_distances(np.array([0.0, 1.0]), np.array([2.0, 3.0]), (0.5,)).metrics
    assert m["eer"] == 0.0 and m["eer_threshold"] == 1.0
    # reversed: every t has max(FMR, FNMR) = 1, the smallest is -inf -> just below the smallest distance
    pos, neg = np.array([2.0, 3.0], np.float32), np.array([0.0, 1.0], np.float32)
    m = verification_from_distances(pos, neg, (0.5,)).metrics
    assert m["eer"] == 1.0 and m["eer_threshold"] == below32(0.0)


def test_all_negatives_tied():
    pos = np.array([0.1, 0.5, 0.9], np.float32)
    neg = np.full(8, 0.5, np.float32)
    m = verification_from_distances(pos, neg, (0.1, 0.5)).metrics
    # FMR(0.5) = 1 > x: no negative can be accepted -> t just below 0.5; positives > t: 0.5, 0.9 -> 2/3
    for x in ("0.1", "0.5"):
        assert m[f"threshold@fmr_{x}"] == below32(0.5) and m[f"fnmr@fmr_{x}"] == 2 / 3
    # t=0.1: max(0, 2/3); t=0.5: max(1, 1/3); -inf and 0.9 give 1 -> EER 2/3 at 0.1
    assert m["eer"] == 2 / 3 and m["eer_threshold"] == np.float32(0.1)


def test_no_positive_or_negative_pairs_gives_nan_with_warning():
    with pytest.warns(UserWarning, match="no negative"):
        r = verification_from_distances(np.array([0.1]), np.zeros(0), (0.1,))
    assert all(math.isnan(v) for v in r.metrics.values())
    with pytest.warns(UserWarning, match="no positive"):
        r = verification_from_distances(np.zeros(0), np.array([0.1]), (0.1,))
    assert all(math.isnan(v) for v in r.metrics.values()) and r.n_neg_pairs == 1
    # embeddings: one label only -> no negative pair
    x = torch.randn(6, 4)
    with pytest.warns(UserWarning, match="no negative"):
        r = verification_metrics(RetrievalSide(x[:3], [1, 1, 1]), RetrievalSide(x[3:], [1, 1, 1]))
    assert r.n_pos_pairs == 9 and math.isnan(r.metrics["eer"])


def test_fmr_vals_checked():
    for bad in (0, 1, 10, -0.1, ()):
        with pytest.raises(ValueError):
            check_fmr_vals(bad)
    assert check_fmr_vals([0.1, 0.1, 0.01]) == (0.1, 0.01)
    assert count_limit(0.1, 10) == 1 and count_limit(0.3, 10) == 3 and count_limit(0.001, 999) == 0


# --- brute force -----------------------------------------------------------------------------------------------


def brute_force(pos: np.ndarray, neg: np.ndarray, fmr_vals) -> dict[str, float]:
    """The definitions with loops: every distinct distance (and -inf) is tried as a threshold."""
    out = {}
    n_pos, n_neg = len(pos), len(neg)

    def fmr(t):
        return sum(1 for v in neg if v <= t) / n_neg

    def fnmr(t):
        return sum(1 for v in pos if v > t) / n_pos

    for x in fmr_vals:
        ok = [v for v in set(neg.tolist()) if fmr(v) <= x]
        t = max(ok) if ok else float(np.nextafter(neg.min(), neg.dtype.type(-np.inf)))
        out[f"threshold@fmr_{x:g}"], out[f"fnmr@fmr_{x:g}"] = t, fnmr(t)
    best, best_t = math.inf, None
    for t in [-math.inf] + sorted(set(pos.tolist()) | set(neg.tolist())):
        worst = max(fmr(t), fnmr(t))
        if worst < best:
            best, best_t = worst, t
    lowest = min(pos.min(), neg.min())
    out["eer"] = best
    out["eer_threshold"] = best_t if best_t != -math.inf else float(np.nextafter(lowest, lowest.dtype.type(-np.inf)))
    return out


@pytest.mark.parametrize("seed", range(8))
def test_against_brute_force_with_many_ties(seed):
    rng = np.random.default_rng(seed)
    n_pos, n_neg = rng.integers(1, 40), rng.integers(1, 200)
    pos = np.round(rng.normal(0.6, 0.3, n_pos), 1).astype(np.float32)  # rounded: many ties
    neg = np.round(rng.normal(1.0, 0.3, n_neg), 1).astype(np.float32)
    fmr_vals = (0.5, 0.1, 0.05, 0.01, 0.001)
    got = verification_from_distances(pos, neg, fmr_vals).metrics
    assert got == brute_force(pos, neg, fmr_vals)


# --- OML ---------------------------------------------------------------------------------------------------------


def test_oml_fnmr_at_fmr_where_the_definitions_coincide():
    """OML (installed version): threshold = np.quantile(neg, x) (linear interpolation, x as a fraction, not percent)
    and FNMR = #pos >= threshold. With distinct negatives and (n_neg - 1) * x a whole number m, the quantile is the
    negative v[m] (0-based, sorted); ours accepts c = floor(x * n_neg) = m negatives, threshold v[m - 1], and
    FNMR = #pos > v[m - 1]. They coincide unless a positive lies strictly between v[m - 1] and v[m]: such a
    positive is a non-match for us (FMR <= x allows only m negatives) and a match for OML. They also differ with
    tied negatives (we never split a tie) and when the quantile interpolates between two negatives."""
    from oml.functional.metrics import calc_fnmr_at_fmr

    fmr_vals = (0.1, 0.25, 0.5, 0.75)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        neg = np.sort(rng.permutation(np.arange(1000))[:101] / 100.0)  # distinct, n_neg = 101
        pos = rng.uniform(0, 10, 60)
        for x in fmr_vals:  # no positive strictly between v[m - 1] and v[m]
            m = round(100 * x)
            assert np.quantile(neg, x) == neg[m]  # the family: the quantile lands on a negative
            pos = pos[~((pos > neg[m - 1]) & (pos < neg[m]))]
        ours = verification_from_distances(pos, neg, fmr_vals).metrics
        oml = calc_fnmr_at_fmr(pos, neg, fmr_vals).numpy()
        assert [ours[f"fnmr@fmr_{x:g}"] for x in fmr_vals] == pytest.approx(oml.tolist(), abs=1e-6)
    # where they differ: one positive inside the gap around x = 0.5
    neg = np.arange(101) / 100.0
    pos = np.array([0.495, 0.9])
    ours = verification_from_distances(pos, neg, (0.5,)).metrics["fnmr@fmr_0.5"]
    assert ours == 1.0 and float(calc_fnmr_at_fmr(pos, neg, (0.5,))[0]) == 0.5


# --- over embeddings -------------------------------------------------------------------------------------------


def dense_reference(query: RetrievalSide, gallery: RetrievalSide, distance: str, block_size: int):
    """Positive / negative distances with every exclusion applied by hand on full Q x G masks. The distances are
    the module's float32 formula (BlockDistances) on the same blocks, so the bits are the ones the blocked code
    sees (a float32 matrix product's bits depend on the shapes it is called with)."""
    inputs = check_inputs(query, gallery)
    pairs = Pairs.of(inputs)
    dist = BlockDistances(inputs, distance)
    blocks = plan_blocks(inputs.n_q, inputs.n_g, block_size, pairs.positives.query_counts + pairs.excluded_counts)
    d = np.concatenate([dist.block(lo, hi, torch.empty(hi - lo, inputs.n_g)).numpy().copy() for lo, hi in blocks])
    # the formula against float64 distances computed here
    q64, g64 = inputs.q_emb.double().numpy(), inputs.g_emb.double().numpy()
    if distance == "cosine":
        qn, gn = q64 / np.linalg.norm(q64, axis=1)[:, None], g64 / np.linalg.norm(g64, axis=1)[:, None]
        exact = 1 - qn @ gn.T
    else:
        exact = np.sqrt(((q64[:, None, :] - g64[None, :, :]) ** 2).sum(-1))
    scale = float(np.abs(q64).max() + np.abs(g64).max())
    assert np.abs(d - exact).max() <= 1e-3 * max(scale, 1.0)
    same_label = inputs.q_lab[:, None] == inputs.g_lab[None, :]
    has_seq = np.array([v is not None for v in inputs.q_seq])[:, None]  # a missing sequence matches nothing
    excluded = (inputs.q_ids[:, None] == inputs.g_ids[None, :]) | (
        (inputs.q_seq[:, None] == inputs.g_seq[None, :]) & has_seq)
    return d[same_label & ~excluded], d[~same_label & ~excluded]


def make_sides(seed: int, concentrated: bool):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(40, 120))
    dim = int(rng.integers(2, 12))
    labels = rng.integers(0, int(rng.integers(2, 8)), n)
    if concentrated:  # a few distinct distances: large ties, many negatives in one histogram bin
        emb = rng.integers(-1, 2, size=(n, dim)).astype(np.float32)
        emb[np.abs(emb).sum(1) == 0, 0] = 1.0  # no zero row (cosine)
        emb *= 0.37
    else:
        emb = (rng.normal(size=(n, dim)) + 3.0).astype(np.float32)
    ids = rng.integers(0, n, n)  # repeated ids: a row may be query and gallery
    seqs = np.array([f"s{v}" if v >= 0 else None for v in rng.integers(-3, 15, n)], dtype=object)
    q = rng.choice(n, n // 3, replace=False)
    g = rng.choice(n, 2 * n // 3, replace=False)
    side = lambda rows: RetrievalSide(emb[rows], labels[rows], ids[rows], seqs[rows])  # noqa: E731
    return side(q), side(g)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", range(6))
def test_blocked_equals_dense_reference(seed, distance, monkeypatch):
    monkeypatch.setattr(verification, "GALLERY_CHUNK", 7)  # several gallery chunks too
    query, gallery = make_sides(seed, concentrated=seed % 2 == 0)
    block_size = 1 + seed % 4
    fmr_vals = (0.5, 0.2, 0.1, 0.01, 0.001)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = verification_metrics(query, gallery, distance, fmr_vals, block_size=block_size)
    pos, neg = dense_reference(query, gallery, distance, block_size)
    want = verification_from_distances(pos, neg, fmr_vals)
    assert (got.n_pos_pairs, got.n_neg_pairs) == (len(pos), len(neg)) and len(pos) > 0 and len(neg) > 0
    assert got.metrics == want.metrics
    assert got.operating_points == want.operating_points
    np.testing.assert_array_equal(got.pos, np.sort(pos))
    assert got.neg_hist_counts.sum() == len(neg)
    if seed % 2 == 0:  # the concentrated sets do put many negatives into one pass-1 bin
        bins = verification.Binner(BlockDistances(check_inputs(query, gallery), distance).bound)
        counts = np.bincount(bins(torch.from_numpy(neg)).numpy())
        assert counts.max() >= 20


def test_blocked_default_block_and_single_row_blocks():
    query, gallery = make_sides(11, concentrated=False)
    a = verification_metrics(query, gallery, "euclidean", block_size=None)
    b = verification_metrics(query, gallery, "euclidean", block_size=1)
    for k in a.metrics:  # different block shapes may change float32 bits: equal up to rounding
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-5, abs=1e-6)
    with pytest.raises(ValueError, match="block_size"):
        verification_metrics(query, gallery, block_size=0)
    with pytest.raises(ValueError, match="distance"):
        verification_metrics(query, gallery, distance="manhattan")


# --- pictures --------------------------------------------------------------------------------------------------


PNG = b"\x89PNG\r\n\x1a\n"


def test_pictures_are_written(tmp_path):
    query, gallery = make_sides(3, concentrated=False)
    r = verification_metrics(query, gallery, "euclidean", (0.1, 0.01))
    roc = roc_figure(r, tmp_path / "roc.png")
    hist = distance_histograms_figure(r, tmp_path / "hist.png", threshold_at_fmr(r, 0.1))
    for path in (roc, hist):
        assert path is not None and path.read_bytes()[:8] == PNG and path.stat().st_size > 1000
    r2 = verification_from_distances(np.array([0.1, 0.2, 0.2, 0.5]), np.linspace(0.2, 1.1, 10), (0.1,))
    assert roc_figure(r2, tmp_path / "roc2.png") is not None
    assert distance_histograms_figure(r2, tmp_path / "hist2.png", r2.metrics["eer_threshold"]) is not None


def test_degenerate_pictures_are_skipped_with_a_warning(tmp_path, caplog):
    with pytest.warns(UserWarning):
        r = verification_from_distances(np.zeros(0), np.array([0.1, 0.2]), (0.1,))
    with caplog.at_level(logging.WARNING):
        assert roc_figure(r, tmp_path / "roc.png") is None
        assert distance_histograms_figure(r, tmp_path / "hist.png", 0.1) is None
        ok = verification_from_distances(np.array([0.1]), np.array([0.2]), (0.1,))
        assert distance_histograms_figure(ok, tmp_path / "hist2.png", math.nan) is None
    assert caplog.text.count("skipped") == 3
    assert not list(tmp_path.iterdir())
