"""The exact retrieval / re-ID metric engine: hand-built cases, a naive O(Q*G) reference, OML, faiss, blocks, errors."""
from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from oml.functional.metrics import calc_pcf
from oml.interfaces.datasets import IQueryGalleryLabeledDataset
from oml.metrics.embeddings import calc_retrieval_metrics_rr
from oml.retrieval.retrieval_results import RetrievalResults

from metriclab.evaluation import blocks
from metriclab.evaluation.engine import PER_QUERY_COLUMNS, RetrievalSide, RetrievalSpec, evaluate_retrieval

torch.set_num_threads(1)

SIDE_FIELDS = ("ids", "sequences", "categories")


def evaluate(query_embeddings, gallery_embeddings, query_labels, gallery_labels, **kwargs):
    """The engine with every input spelt as one argument: ``query_<field>`` / ``gallery_<field>`` go to that side's
    `RetrievalSide`, the rest to the `RetrievalSpec`. All three are made here, so a check in any of them raises
    inside the caller's `pytest.raises`, and an error names the argument as written."""
    sides = {
        side: {f: kwargs.pop(f"{side}_{f}") for f in SIDE_FIELDS if f"{side}_{f}" in kwargs}
        for side in ("query", "gallery")
    }
    return evaluate_retrieval(RetrievalSide(query_embeddings, query_labels, **sides["query"]),
                              RetrievalSide(gallery_embeddings, gallery_labels, **sides["gallery"]),
                              RetrievalSpec(**kwargs))

CMC_K, MAP_K, PREC_K, KNN_K = (1, 3, 5), (3, 5), (3, 5), (1, 3, 4)


# ------------------------------------------------------------------------------------------------------------------
# naive reference: one query at a time, float64, whole ranking sorted by (distance, wrong-before-true, gallery index)


def naive_reference(q, g, ql, gl, *, qids=None, gids=None, qseq=None, gseq=None, distance="euclidean",
                    keep_top_k=10):
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    rows = []
    topk_ids = np.full((len(q), keep_top_k), -1)
    topk_dist = np.full((len(q), keep_top_k), np.inf)
    for i in range(len(q)):
        if distance == "euclidean":
            d = np.sqrt(((g - q[i]) ** 2).sum(1))
        else:
            d = 1 - g @ q[i] / (np.linalg.norm(g, axis=1) * np.linalg.norm(q[i]))
        excluded = np.zeros(len(g), bool)
        if qids is not None:
            excluded |= np.asarray(gids) == qids[i]
        if qseq is not None:
            excluded |= np.asarray(gseq, dtype=object) == qseq[i]
        cand = np.flatnonzero(~excluded)
        true = gl[cand] == ql[i]
        order = np.lexsort((cand, true, d[cand]))
        ranked, ranked_true = cand[order], true[order]
        n = min(keep_top_k, len(ranked))
        topk_ids[i, :n], topk_dist[i, :n] = ranked[:n], d[ranked[:n]]
        ranks = np.flatnonzero(ranked_true) + 1
        row = {"valid": len(ranks) > 0, "n_true": len(ranks)}
        if len(ranks):
            pos = np.arange(1, len(ranks) + 1)
            row.update(first=ranks[0], ap=np.mean(pos / ranks), inp=len(ranks) / ranks[-1])
            for k in CMC_K:
                row[f"cmc@{k}"] = float(ranks[0] <= k)
            for k in MAP_K:
                hit = ranks <= k
                row[f"map@{k}"] = (pos[hit] / ranks[hit]).sum() / hit.sum() if hit.any() else 0.0
            for k in PREC_K:
                row[f"precision@{k}"] = (ranks <= k).sum() / min(k, len(ranks))
            for k in KNN_K:
                labels = gl[ranked[:k]]
                counts = Counter(labels.tolist())
                best = max(counts, key=lambda lab: (counts[lab], -list(labels).index(lab)))
                row[f"knn_accuracy@{k}"] = float(best == ql[i])
        else:
            row.update(first=0, ap=np.nan, inp=np.nan)
        rows.append(row)
    per_query = pd.DataFrame(rows)
    valid = per_query["valid"].to_numpy()
    metrics = {}
    for name in [f"cmc@{k}" for k in CMC_K] + ["mAP", "mINP"] + [f"map@{k}" for k in MAP_K] + \
            [f"precision@{k}" for k in PREC_K] + [f"knn_accuracy@{k}" for k in KNN_K]:
        column = {"mAP": "ap", "mINP": "inp"}.get(name, name)
        metrics[name] = float(per_query.loc[valid, column].mean())
    metrics["n_queries"] = float(valid.sum())
    metrics["n_queries_skipped"] = float((~valid).sum())
    return metrics, per_query, topk_ids, topk_dist


def run(q, g, ql, gl, **kwargs):
    kwargs.setdefault("pcf_variance", ())
    return evaluate(q, g, ql, gl, cmc_top_k=CMC_K, map_top_k=MAP_K, precision_top_k=PREC_K,
                    knn_top_k=KNN_K, **kwargs)


def reid_data(seed, distance, n_rows=140, n_labels=12, n_cams=3, tied=True, dim=16):
    """Rows that are query, gallery or both (shared ids), labels and sequences '<label>_c<cam>'.

    tied=True: small integer (euclidean) or +-1 (cosine, dim 16, norm exactly 4) vectors, so every distance is exact
    in float32 and there are many ties; tied=False: Gaussian vectors (no ties)."""
    rng = np.random.default_rng(seed)
    if not tied:
        emb = rng.normal(size=(n_rows, dim))
    elif distance == "euclidean":
        emb = rng.integers(-2, 3, size=(n_rows, 4)).astype(np.float64)
    else:
        emb = rng.choice([-1.0, 1.0], size=(n_rows, 16))
    labels = rng.integers(0, n_labels, n_rows)
    role = rng.integers(0, 3, n_rows)  # 0 query only, 1 gallery only, 2 both
    labels[np.flatnonzero(role == 0)[:3]] = 100 + np.arange(3)  # labels absent from the gallery: skipped queries
    seqs = np.array([f"{lab}_c{cam}" for lab, cam in zip(labels, rng.integers(0, n_cams, n_rows))], dtype=object)
    qi, gi = np.flatnonzero(role != 1), np.flatnonzero(role != 0)
    return dict(q=emb[qi], g=emb[gi], ql=labels[qi], gl=labels[gi], qids=qi, gids=gi, qseq=seqs[qi], gseq=seqs[gi],
                emb=emb, labels=labels, seqs=seqs, is_query=role != 1, is_gallery=role != 0)


def assert_matches_reference(report, ref, *, exact_distances):
    metrics, per_query, topk_ids, topk_dist = ref
    for name, value in metrics.items():
        assert report.metrics[name] == pytest.approx(value, abs=1e-12, nan_ok=True), name
    pq = report.per_query
    np.testing.assert_array_equal(pq["valid"], per_query["valid"])
    np.testing.assert_array_equal(pq["n_true"], per_query["n_true"])
    np.testing.assert_array_equal(pq["first_hit_rank"], per_query["first"])
    np.testing.assert_allclose(pq["ap"], per_query["ap"], rtol=1e-12)
    np.testing.assert_allclose(pq["inp"], per_query["inp"], rtol=1e-12)
    np.testing.assert_array_equal(report.topk_ids, topk_ids)
    np.testing.assert_allclose(report.topk_distances, topk_dist, rtol=1e-5, atol=1e-5 if exact_distances else 1e-4)


# ------------------------------------------------------------------------------------------------------------------
# hand-built cases


def test_perfect_ranking_gives_all_ones():
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    g = np.repeat(centres, 3, axis=0) + np.tile([[0.1, 0], [0, 0.1], [-0.1, 0]], (3, 1))
    gl = np.repeat([0, 1, 2], 3)
    spec = RetrievalSpec(cmc_top_k=(1, 3), map_top_k=(3, 5), precision_top_k=(3, 5), knn_top_k=(1, 3),
                         pcf_variance=())
    r = evaluate_retrieval(RetrievalSide(centres, [0, 1, 2]), RetrievalSide(g, gl), spec)
    for name in ["cmc@1", "cmc@3", "mAP", "mINP", "map@3", "map@5", "precision@3", "precision@5",
                 "knn_accuracy@1", "knn_accuracy@3"]:
        assert r.metrics[name] == 1.0, name
    assert r.metrics["n_queries"] == 3.0 and r.metrics["n_queries_skipped"] == 0.0
    assert r.per_query["first_hit_rank"].tolist() == [1, 1, 1]
    assert r.per_query["n_true"].tolist() == [3, 3, 3]
    assert set(r.topk_ids[0, :3]) == {0, 1, 2} and r.topk_ids.shape == (3, 10)
    assert (r.topk_ids[:, 9] == -1).all() and np.isinf(r.topk_distances[:, 9]).all()  # only 9 gallery items


def test_worst_ranking_hand_computed():
    # 1-D: query at 0; wrong items (labels 7, 8, 9) at 1, 2, 3; true matches (label 1) at 10, 11
    g = np.array([[10.0], [1.0], [11.0], [2.0], [3.0]])
    gl = np.array([1, 7, 1, 8, 9])
    r = evaluate(np.zeros((1, 1)), g, [1], gl, cmc_top_k=(1, 3, 4, 5), map_top_k=(3, 5),
                 precision_top_k=(3, 5), knn_top_k=(1, 3, 5), pcf_variance=())
    m = r.metrics
    assert r.per_query["first_hit_rank"].tolist() == [4]  # true matches at ranks 4 and 5
    assert (m["cmc@1"], m["cmc@3"], m["cmc@4"], m["cmc@5"]) == (0.0, 0.0, 1.0, 1.0)
    assert m["mAP"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert m["mINP"] == pytest.approx(2 / 5)
    assert m["map@3"] == 0.0 and m["map@5"] == pytest.approx((1 / 4 + 2 / 5) / 2)
    assert m["precision@3"] == 0.0 and m["precision@5"] == 1.0  # 2 hits / min(5, n_true=2)
    # 5-NN vote: labels 7, 8, 9, 1, 1 -> label 1 wins with 2 votes
    assert (m["knn_accuracy@1"], m["knn_accuracy@3"], m["knn_accuracy@5"]) == (0.0, 0.0, 1.0)
    assert r.topk_ids[0, :5].tolist() == [1, 3, 4, 0, 2]
    np.testing.assert_allclose(r.topk_distances[0, :5], [1, 2, 3, 10, 11])


def test_ties_are_ranked_pessimistically():
    # query at 0; gallery: true match at +1 (index 0), wrong items at -1 (index 1) and +1 (index 2), far true match
    g = np.array([[1.0], [-1.0], [1.0], [5.0]])
    gl = np.array([1, 2, 3, 1])
    r = evaluate(np.zeros((1, 1)), g, [1], gl, cmc_top_k=(1, 2, 3), map_top_k=(3,), precision_top_k=(3,),
                 knn_top_k=(1, 3), keep_top_k=4, pcf_variance=())
    # all three at distance 1 tie: both wrong items go first (lower index first), then the true match
    assert r.topk_ids[0].tolist() == [1, 2, 0, 3]
    assert r.per_query["first_hit_rank"].tolist() == [3]
    assert r.metrics["cmc@2"] == 0.0 and r.metrics["cmc@3"] == 1.0
    assert r.metrics["mAP"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    assert r.metrics["mINP"] == pytest.approx(2 / 4)
    # 3-NN labels 2, 3, 1: three-way tie, the nearest (label 2) wins -> wrong
    assert r.metrics["knn_accuracy@3"] == 0.0
    # the tie group crosses the cut of a 1-long list: still the first wrong item by index
    r1 = evaluate(np.zeros((1, 1)), g, [1], gl, keep_top_k=1, knn_top_k=(1,), pcf_variance=())
    assert r1.topk_ids.tolist() == [[1]]
    # a collapsed model (every embedding equal) gets the worst score, not an index-order lottery
    rc = evaluate(np.ones((1, 3)), np.ones((4, 3)), [1], gl, cmc_top_k=(1,), pcf_variance=())
    assert rc.metrics["cmc@1"] == 0.0 and rc.per_query["first_hit_rank"].tolist() == [3]


def test_query_without_valid_match_is_skipped_and_counted():
    g = np.array([[0.0], [1.0], [2.0]])
    gl = np.array([0, 1, 1])
    q, ql = np.array([[0.1], [5.0], [1.1]]), np.array([0, 42, 1])  # label 42 is not in the gallery
    with pytest.warns(UserWarning, match="1 of 3 queries have no valid true match"):
        r = evaluate(q, g, ql, gl, cmc_top_k=(1,), pcf_variance=())
    assert r.metrics["n_queries"] == 2.0 and r.metrics["n_queries_skipped"] == 1.0
    assert r.metrics["cmc@1"] == 1.0 and r.metrics["mAP"] == 1.0  # the skipped query does not pull it to 2/3
    pq = r.per_query
    assert pq["valid"].tolist() == [True, False, True]
    assert pq.loc[1, "first_hit_rank"] == 0 and np.isnan(pq.loc[1, "ap"]) and np.isnan(pq.loc[1, "inp"])
    assert pq.loc[1, "n_true"] == 0
    assert list(pq.columns) == list(PER_QUERY_COLUMNS)
    with pytest.warns(UserWarning, match="No query has a valid true match"):
        r0 = evaluate(q[1:2], g, ql[1:2], gl, pcf_variance=())
    assert np.isnan(r0.metrics["mAP"]) and r0.metrics["n_queries"] == 0.0


def test_same_camera_sequence_exclusion_changes_the_answer():
    # Market-style: query pid 1 cam 1; nearest gallery item is the same pid from the same camera (excluded),
    # then a wrong pid, then pid 1 from camera 2
    g = np.array([[0.1], [0.5], [0.9]])
    gl = np.array([1, 2, 1])
    gseq = ["1_c1", "2_c1", "1_c2"]
    plain = evaluate(np.zeros((1, 1)), g, [1], gl, cmc_top_k=(1,), pcf_variance=())
    assert plain.metrics["cmc@1"] == 1.0 and plain.per_query["n_true"].tolist() == [2]
    r = evaluate(np.zeros((1, 1)), g, [1], gl, query_sequences=["1_c1"], gallery_sequences=gseq,
                 cmc_top_k=(1,), keep_top_k=3, pcf_variance=())
    assert r.metrics["cmc@1"] == 0.0 and r.metrics["mAP"] == 0.5
    assert r.per_query["first_hit_rank"].tolist() == [2] and r.per_query["n_true"].tolist() == [1]
    assert r.topk_ids.tolist() == [[1, 2, -1]]  # the excluded item never shows up
    # a query whose only true matches share its sequence has no valid match
    with pytest.warns(UserWarning):
        r2 = evaluate(np.zeros((1, 1)), g[:2], [1], gl[:2], query_sequences=["1_c1"],
                      gallery_sequences=gseq[:2], pcf_variance=())
    assert r2.metrics["n_queries_skipped"] == 1.0
    # missing sequences (None/NaN) belong to no sequence: nothing is excluded
    r3 = evaluate(np.zeros((1, 1)), g, [1], gl, query_sequences=[None],
                  gallery_sequences=[None, np.nan, None], cmc_top_k=(1,), pcf_variance=())
    assert r3.metrics["cmc@1"] == 1.0 and r3.per_query["n_true"].tolist() == [2]


def test_same_row_exclusion():
    # 4 rows, all both query and gallery: each query finds itself at distance 0 unless ids exclude it
    emb = np.array([[0.0], [0.2], [5.0], [5.3]])
    labels = np.array([0, 0, 1, 1])
    plain = evaluate(emb, emb, labels, labels, pcf_variance=())
    assert plain.topk_ids[:, 0].tolist() == [0, 1, 2, 3] and plain.per_query["n_true"].tolist() == [2, 2, 2, 2]
    r = evaluate(emb, emb, labels, labels, query_ids=[10, 11, 12, 13], gallery_ids=[10, 11, 12, 13],
                 keep_top_k=4, pcf_variance=())
    assert r.topk_ids.tolist() == [[1, 2, 3, -1], [0, 2, 3, -1], [3, 1, 0, -1], [2, 1, 0, -1]]
    assert r.per_query["n_true"].tolist() == [1, 1, 1, 1]
    assert r.metrics["cmc@1"] == 1.0 and r.metrics["mAP"] == 1.0
    np.testing.assert_allclose(r.topk_distances[0, :3], [0.2, 5.0, 5.3], rtol=1e-6)


# ------------------------------------------------------------------------------------------------------------------
# naive reference on random data


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [True, False])
def test_matches_naive_reference(seed, distance, tied):
    d = reid_data(seed, distance, tied=tied)
    kwargs = dict(qids=d["qids"], gids=d["gids"], qseq=d["qseq"], gseq=d["gseq"], distance=distance)
    ref = naive_reference(d["q"], d["g"], d["ql"], d["gl"], **kwargs)
    assert 0 < ref[0]["n_queries_skipped"] < len(d["q"])  # the data has skipped queries
    with pytest.warns(UserWarning, match="no valid true match"):
        r = run(d["q"], d["g"], d["ql"], d["gl"], query_ids=d["qids"], gallery_ids=d["gids"],
                query_sequences=d["qseq"], gallery_sequences=d["gseq"], distance=distance, block_size=16)
    assert_matches_reference(r, ref, exact_distances=tied)
    assert r.distance == distance and r.backend == "exact"


def test_matches_naive_reference_without_exclusions_torch_inputs():
    d = reid_data(5, "euclidean", tied=True)
    ref = naive_reference(d["q"], d["g"], d["ql"], d["gl"])
    with pytest.warns(UserWarning):
        r = run(torch.tensor(d["q"]), torch.tensor(d["g"], dtype=torch.float32), torch.tensor(d["ql"]),
                torch.tensor(d["gl"]))
    assert_matches_reference(r, ref, exact_distances=True)


# ------------------------------------------------------------------------------------------------------------------
# OML


class _EmbeddingsDataset(IQueryGalleryLabeledDataset):
    """Just what RetrievalResults.from_embeddings reads: query/gallery ids, labels and the sequence column."""

    def __init__(self, labels, is_query, is_gallery, sequence=None):
        self._labels, self._q, self._g = np.asarray(labels), np.asarray(is_query), np.asarray(is_gallery)
        self.extra_data = {} if sequence is None else {"sequence": list(sequence)}

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, item):
        return {"idx": item}

    def get_labels(self):
        return self._labels

    def get_query_ids(self):
        return torch.from_numpy(np.flatnonzero(self._q))

    def get_gallery_ids(self):
        return torch.from_numpy(np.flatnonzero(self._g))


def oml_metrics(emb, labels, is_query, is_gallery, sequence, valid_mask, cmc_k, prec_k, map_k):
    dataset = _EmbeddingsDataset(labels, is_query, is_gallery, sequence)
    n_gallery = int(np.sum(is_gallery))
    with warnings.catch_warnings():  # OML warns about queries without true matches; we mask them below
        warnings.simplefilter("ignore", UserWarning)
        rr = RetrievalResults.from_embeddings(torch.tensor(emb, dtype=torch.float32), dataset, n_items=n_gallery)
    raw = calc_retrieval_metrics_rr(rr, cmc_top_k=cmc_k, precision_top_k=prec_k, map_top_k=map_k, reduce=False,
                                    verbose=False)
    mask = torch.from_numpy(np.array(valid_mask, dtype=bool))
    out = {}
    for name, per_k in raw.items():
        for k, values in per_k.items():
            out[f"{name}@{k}"] = float(values[mask].mean())
    return out


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("normalised", [False, True])
def test_agrees_with_oml_where_definitions_coincide(seed, normalised):
    d = reid_data(seed, "euclidean", n_rows=160, n_labels=15, tied=False, dim=12)
    emb, labels, seq, is_query, is_gallery = d["emb"], d["labels"], d["seqs"], d["is_query"], d["is_gallery"]
    if normalised:  # OML is Euclidean only; on unit vectors it ranks like our cosine distance
        emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    qi, gi = d["qids"], d["gids"]
    with pytest.warns(UserWarning):
        r = evaluate(emb[qi], emb[gi], labels[qi], labels[gi], query_ids=qi, gallery_ids=gi,
                     query_sequences=seq[qi], gallery_sequences=seq[gi], cmc_top_k=(1, 5, 10),
                     precision_top_k=(1, 5), map_top_k=(5, 10), pcf_variance=(),
                     distance="cosine" if normalised else "euclidean")
    valid = r.per_query["valid"].to_numpy()
    assert not valid.all()  # OML would average the invalid ones in; we compare on the valid queries
    oml = oml_metrics(emb, labels, is_query, is_gallery, seq, valid, (1, 5, 10), (1, 5), (5, 10, len(gi)))
    for k in (1, 5, 10):
        assert r.metrics[f"cmc@{k}"] == pytest.approx(oml[f"cmc@{k}"], abs=1e-6)
    for k in (1, 5):
        assert r.metrics[f"precision@{k}"] == pytest.approx(oml[f"precision@{k}"], abs=1e-6)
    for k in (5, 10):
        assert r.metrics[f"map@{k}"] == pytest.approx(oml[f"map@{k}"], abs=1e-6)
    # OML's map@G over the full retrieved list is re-ID mAP
    assert r.metrics["mAP"] == pytest.approx(oml[f"map@{len(gi)}"], abs=1e-6)


def test_map_equals_oml_full_gallery_when_every_query_is_valid():
    rng = np.random.default_rng(3)
    q, g = rng.normal(size=(40, 8)), rng.normal(size=(200, 8))
    ql, gl = rng.integers(0, 10, 40), np.arange(200) % 10  # every label in the gallery
    emb = np.concatenate([q, g])
    labels = np.concatenate([ql, gl])
    is_query = np.r_[np.ones(40, bool), np.zeros(200, bool)]
    r = evaluate(q, g, ql, gl, pcf_variance=(), cmc_top_k=(1, 5), map_top_k=(5,), precision_top_k=(5,))
    assert r.metrics["n_queries_skipped"] == 0.0
    dataset = _EmbeddingsDataset(labels, is_query, ~is_query)
    rr = RetrievalResults.from_embeddings(torch.tensor(emb, dtype=torch.float32), dataset, n_items=200)
    oml = calc_retrieval_metrics_rr(rr, cmc_top_k=(1, 5), precision_top_k=(5,), map_top_k=(5, 200), verbose=False)
    assert r.metrics["mAP"] == pytest.approx(float(oml["map"][200]), abs=1e-6)
    assert r.metrics["map@5"] == pytest.approx(float(oml["map"][5]), abs=1e-6)
    assert r.metrics["cmc@5"] == pytest.approx(float(oml["cmc"][5]), abs=1e-6)
    assert r.metrics["precision@5"] == pytest.approx(float(oml["precision"][5]), abs=1e-6)


def test_pcf_is_oml_calc_pcf_over_query_and_gallery():
    rng = np.random.default_rng(0)
    scales = np.linspace(3, 0.1, 10)
    q, g = rng.normal(size=(15, 10)) * scales, rng.normal(size=(40, 10)) * scales
    ql, gl = rng.integers(0, 3, 15), rng.integers(0, 3, 40)
    variances = (0.3, 0.5, 0.9)
    expected = calc_pcf(torch.tensor(np.concatenate([q, g]), dtype=torch.float32), variances)
    r = evaluate(q, g, ql, gl, pcf_variance=variances)
    assert [r.metrics[f"pcf@{v}"] for v in variances] == pytest.approx([float(x) for x in expected])
    # rows that are both query and gallery (same id) are counted once: gallery rows 0..14 are the queries
    g2 = np.concatenate([q, g])
    gl2 = np.concatenate([ql, gl])
    r2 = evaluate(q, g2, ql, gl2, query_ids=np.arange(15), gallery_ids=np.arange(55), pcf_variance=variances)
    assert [r2.metrics[f"pcf@{v}"] for v in variances] == pytest.approx([float(x) for x in expected])
    # more rows and dims, correlated features: still OML's numbers
    mix = rng.normal(size=(24, 24)) * np.linspace(2, 0.05, 24)
    qb, gb = rng.normal(size=(200, 24)) @ mix + 3.0, rng.normal(size=(700, 24)) @ mix + 3.0
    many = tuple(np.round(np.linspace(0.05, 0.95, 19), 2))
    rb = evaluate(qb, gb, np.zeros(200, int), np.zeros(700, int), pcf_variance=many)
    expected_b = calc_pcf(torch.tensor(np.concatenate([qb, gb]), dtype=torch.float32), many)
    assert [rb.metrics[f"pcf@{v}"] for v in many] == pytest.approx([float(x) for x in expected_b])
    # few rows (n <= 2 * dim) go straight to OML's function
    r3 = evaluate(q[:4], g[:6], ql[:4], ql[:4].tolist() + [0, 1], pcf_variance=variances)
    small = calc_pcf(torch.tensor(np.concatenate([q[:4], g[:6]]), dtype=torch.float32), variances)
    assert [r3.metrics[f"pcf@{v}"] for v in variances] == pytest.approx([float(x) for x in small])


# ------------------------------------------------------------------------------------------------------------------
# faiss, blocks, categories


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_faiss_flat_equals_exact_for_topk_metrics(distance):
    d = reid_data(7, distance, tied=False, n_rows=200)
    kwargs = dict(query_ids=d["qids"], gallery_ids=d["gids"], query_sequences=d["qseq"],
                  gallery_sequences=d["gseq"], distance=distance, block_size=32)
    with pytest.warns(UserWarning):
        exact = run(d["q"], d["g"], d["ql"], d["gl"], **kwargs)
    with pytest.warns(UserWarning):
        flat = run(d["q"], d["g"], d["ql"], d["gl"], backend="faiss-flat", **kwargs)
    assert flat.backend == "faiss-flat"
    assert "mAP" not in flat.metrics and "mINP" not in flat.metrics
    for name, value in flat.metrics.items():
        assert value == pytest.approx(exact.metrics[name], abs=1e-12), name
    np.testing.assert_array_equal(flat.topk_ids, exact.topk_ids)
    np.testing.assert_allclose(flat.topk_distances, exact.topk_distances, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(flat.per_query["n_true"], exact.per_query["n_true"])
    # first hits within the searched depth agree; deeper ones are 0 (unknown) with faiss
    fh_exact, fh_flat = exact.per_query["first_hit_rank"].to_numpy(), flat.per_query["first_hit_rank"].to_numpy()
    shallow = fh_exact <= 10
    np.testing.assert_array_equal(fh_flat[shallow], fh_exact[shallow])
    assert flat.per_query["ap"].isna().all()
    with pytest.warns(UserWarning):
        hnsw = run(d["q"], d["g"], d["ql"], d["gl"], backend="faiss-hnsw", hnsw_m=8, **kwargs)
    assert hnsw.backend.startswith("faiss-hnsw (approximate: M=8")
    assert hnsw.metrics["cmc@1"] == pytest.approx(exact.metrics["cmc@1"], abs=0.05)


@pytest.mark.parametrize("tied", [True, False])
def test_block_size_does_not_change_results(tied):
    d = reid_data(11, "euclidean", tied=tied)
    kwargs = dict(query_ids=d["qids"], gallery_ids=d["gids"], query_sequences=d["qseq"],
                  gallery_sequences=d["gseq"], pcf_variance=(0.5,))
    with pytest.warns(UserWarning):
        reports = [run(d["q"], d["g"], d["ql"], d["gl"], block_size=b, **kwargs) for b in (1, 7, None)]
    for other in reports[1:]:
        assert other.metrics == reports[0].metrics
        pd.testing.assert_frame_equal(other.per_query, reports[0].per_query)
        np.testing.assert_array_equal(other.topk_ids, reports[0].topk_ids)
        if tied:
            np.testing.assert_array_equal(other.topk_distances, reports[0].topk_distances)
        else:  # a 1-row matrix product may round differently in the last bit
            np.testing.assert_allclose(other.topk_distances, reports[0].topk_distances, rtol=1e-6)


def test_blocks_bound_memory_and_pair_budget_does_not_change_results(monkeypatch):
    plan = blocks.plan_blocks(3368, 19732, None, np.full(3368, 20))
    assert max(hi - lo for lo, hi in plan) * 19732 * 4 <= blocks.BLOCK_BYTES  # one block's float32 distances
    assert plan[0] == (0, 425) and plan[-1][1] == 3368  # 32 MB / (19,732 x 4 bytes)
    assert blocks.plan_blocks(10, 5, None, np.array([3] * 10)) == [(0, 10)]
    d = reid_data(12, "cosine", tied=True)
    kwargs = dict(query_ids=d["qids"], gallery_ids=d["gids"], query_sequences=d["qseq"],
                  gallery_sequences=d["gseq"], distance="cosine")
    with pytest.warns(UserWarning):
        wide = run(d["q"], d["g"], d["ql"], d["gl"], **kwargs)
    monkeypatch.setattr(blocks, "PAIR_BUDGET", 25)  # few (query, gallery) pairs per block: many small blocks
    assert len(blocks.plan_blocks(len(d["q"]), len(d["g"]), None, np.full(len(d["q"]), 10))) == len(d["q"]) // 2
    with pytest.warns(UserWarning):
        narrow = run(d["q"], d["g"], d["ql"], d["gl"], **kwargs)
    assert narrow.metrics == wide.metrics
    pd.testing.assert_frame_equal(narrow.per_query, wide.per_query)
    np.testing.assert_array_equal(narrow.topk_ids, wide.topk_ids)


def test_per_category_keys_equal_metrics_of_that_subset():
    d = reid_data(4, "euclidean", tied=True)
    cats = np.where(d["ql"] % 2 == 0, "even", "odd")
    kwargs = dict(query_sequences=d["qseq"], gallery_sequences=d["gseq"])
    with pytest.warns(UserWarning):
        r = run(d["q"], d["g"], d["ql"], d["gl"], query_categories=cats, **kwargs)
    assert (r.per_query["category"].to_numpy() == cats).all()
    for cat in ("even", "odd"):
        sel = cats == cat
        with pytest.warns(UserWarning):
            sub = run(d["q"][sel], d["g"], d["ql"][sel], d["gl"], query_sequences=d["qseq"][sel],
                      gallery_sequences=d["gseq"])
        for name, value in sub.metrics.items():
            assert r.metrics[f"{cat}/{name}"] == pytest.approx(value, abs=1e-12), name
    assert "even/pcf@0.5" not in r.metrics


# ------------------------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "change, error, match",
    [
        (dict(query_labels=[0, 1]), ValueError, "query_labels has 2 entries but query_embeddings has 3 rows"),
        (dict(gallery_labels=[0, 1, 2]), ValueError, "gallery_labels has 3 entries"),
        (dict(gallery_embeddings=np.zeros((4, 3))), ValueError, "query_embeddings has dim 2 but gallery_embeddings"),
        (dict(query_embeddings=np.array([[0, np.nan]] * 3)), ValueError,
         r"query_embeddings has NaN/inf values in rows \[0, 1, 2\]"),
        (dict(gallery_embeddings=np.zeros((0, 2)), gallery_labels=[]), ValueError, "gallery_embeddings is empty"),
        (dict(query_embeddings=np.zeros(3)), ValueError, "query_embeddings must be 2-D"),
        (dict(distance="manhattan"), ValueError, "distance must be one of"),
        (dict(backend="annoy"), ValueError, "backend must be one of"),
        (dict(query_labels=[0.5, 1, 2]), TypeError, "query_labels must be integers"),
        (dict(query_labels=["a", "b", "c"]), TypeError, "query_labels must be integers"),
        (dict(query_ids=[0, 1, 2]), ValueError, "query_ids was given without gallery_ids"),
        (dict(gallery_sequences=["a"] * 4), ValueError, "gallery_sequences was given without query_sequences"),
        (dict(query_sequences=["a"] * 2, gallery_sequences=["a"] * 4), ValueError, "query_sequences has 2 entries"),
        (dict(query_categories=["x", None, "y"]), ValueError, "query_categories has missing values"),
        (dict(cmc_top_k=(0,)), ValueError, "cmc_top_k must contain positive integers"),
        (dict(pcf_variance=(1.5,)), ValueError, "pcf_variance must contain fractions"),
        (dict(block_size=0), ValueError, "block_size must be a positive integer"),
        (dict(keep_top_k=-1), ValueError, "keep_top_k must be a non-negative integer"),
        (dict(distance="cosine", gallery_embeddings=np.zeros((4, 2))), ValueError,
         r"gallery_embeddings rows \[0, 1, 2, 3\] have zero norm"),
        (dict(query_embeddings=np.array([["a", "b"]] * 3)), TypeError, "query_embeddings must hold real numbers"),
        (dict(gallery_embeddings=np.full((4, 2), 1e30)), ValueError, "gallery_embeddings has values up to 1e"),
        (dict(gallery_categories=["x"] * 4), ValueError, "gallery_categories are not used"),
        (dict(knn_top_k=(1, True)), ValueError, "knn_top_k must contain positive integers"),
        (dict(block_size=2.0), ValueError, "block_size must be a positive integer or None, got 2.0"),
        (dict(hnsw_m=0), ValueError, "hnsw_m must be a positive integer, got 0"),
        (dict(hnsw_ef_search=None), ValueError, "hnsw_ef_search must be a positive integer, got None"),
    ],
)
def test_bad_input_names_the_argument(change, error, match):
    args = dict(query_embeddings=np.ones((3, 2)), gallery_embeddings=np.ones((4, 2)), query_labels=[0, 1, 2],
                gallery_labels=[0, 1, 2, 3])
    args.update(change)
    with pytest.raises(error, match=match):
        evaluate(**args)


def test_the_engine_takes_sides_and_a_spec_not_loose_arrays():
    side = RetrievalSide(np.ones((3, 2)), [0, 1, 2])
    with pytest.raises(TypeError, match="evaluate_retrieval: query must be a RetrievalSide, got ndarray"):
        evaluate_retrieval(np.ones((3, 2)), side)
    with pytest.raises(TypeError, match="evaluate_retrieval: spec must be a RetrievalSpec, got dict"):
        evaluate_retrieval(side, side, {"distance": "cosine"})
    # the default spec: cmc@1/5/10, mAP, mINP, map@r, r_precision, map@5, precision@5, knn_accuracy@1, pcf@0.5,
    # 10 neighbours kept
    r = evaluate_retrieval(side, side)
    assert list(r.metrics) == ["cmc@1", "cmc@5", "cmc@10", "mAP", "mINP", "map@r", "r_precision", "map@5",
                               "precision@5", "knn_accuracy@1", "pcf@0.5", "n_queries", "n_queries_skipped"]
    assert r.topk_ids.shape == (3, 10) and r.distance == "euclidean" and r.backend == "exact"


# ------------------------------------------------------------------------------------------------------------------
# the spec


def test_spec_normalises_its_values_and_is_frozen():
    import dataclasses

    spec = RetrievalSpec(cmc_top_k=3, map_top_k=[5, np.int64(10)], precision_top_k=None, knn_top_k=(np.int32(2),),
                         pcf_variance=0.5, keep_top_k=np.int64(4), block_size=np.int64(64))
    assert spec.cmc_top_k == (3,) and spec.map_top_k == (5, 10) and spec.precision_top_k == ()
    assert spec.knn_top_k == (2,) and spec.pcf_variance == (0.5,)
    assert [type(k) for k in spec.map_top_k + spec.knn_top_k] == [int, int, int]
    assert type(spec.keep_top_k) is int and spec.keep_top_k == 4 and type(spec.block_size) is int
    assert spec.search_depth == 10 and RetrievalSpec(keep_top_k=0, cmc_top_k=(), map_top_k=(), precision_top_k=(),
                                                     knn_top_k=()).search_depth == 1
    assert spec == RetrievalSpec(cmc_top_k=(3,), map_top_k=(5, 10), precision_top_k=(), knn_top_k=(2,),
                                 pcf_variance=(0.5,), keep_top_k=4, block_size=64)
    assert spec.exact and not RetrievalSpec(backend="faiss-flat").exact
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.distance = "cosine"


def test_spec_from_the_evaluation_config_group():
    from omegaconf import OmegaConf

    from metriclab.core.errors import ConfigError
    from metriclab.core.schemas import EvaluationConfig

    cfg = EvaluationConfig(cmc_top_k=[1, 2, 4, 8], map_top_k=[3], precision_top_k=[5, 50], knn_top_k=[1, 5],
                           pcf_variance=[0.3, 0.9], distance="cosine", backend="faiss-flat", grid_top_k=7)
    spec = RetrievalSpec.from_config(cfg)
    assert spec == RetrievalSpec(cmc_top_k=(1, 2, 4, 8), map_top_k=(3,), precision_top_k=(5, 50),
                                 knn_top_k=(1, 5), pcf_variance=(0.3, 0.9), distance="cosine", backend="faiss-flat",
                                 keep_top_k=7, block_size=None, hnsw_m=32, hnsw_ef_construction=200,
                                 hnsw_ef_search=256)
    # what the group does not hold comes as overrides
    assert RetrievalSpec.from_config(cfg, block_size=16, hnsw_m=8).block_size == 16
    assert RetrievalSpec.from_config(cfg, block_size=16, hnsw_m=8).hnsw_m == 8
    # the raw config node (what callers pass during the transition) is built first: same spec, unknown keys fail
    node = OmegaConf.structured(cfg)
    assert RetrievalSpec.from_config(node) == spec
    assert RetrievalSpec.from_config(OmegaConf.to_container(node)) == spec
    assert RetrievalSpec.from_config({}) == RetrievalSpec(keep_top_k=5)  # the schema's defaults: grid_top_k 5
    with pytest.raises(ConfigError, match="`evaluation.cmc_topk` is not a key of `evaluation`"):
        RetrievalSpec.from_config({"cmc_topk": [1]})
    with pytest.raises(ConfigError, match="`evaluation.distance=manhattan` is not supported"):
        RetrievalSpec.from_config({"distance": "manhattan"})

