"""What the engine returns (`RetrievalReport`), the per-query numbers it fills block by block, and their means."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd

from metriclab.evaluation.postprocess import describe
from metriclab.evaluation.ranking import knn_correct
from metriclab.evaluation.spec import RetrievalSpec

PER_QUERY_COLUMNS = ("query_index", "valid", "first_hit_rank", "ap", "inp", "n_true")


#: the plain ranking's metrics beside post-processed ones: `plain/mAP`, ...
PLAIN_PREFIX = "plain/"


@dataclass
class RetrievalReport:
    """Result of `metriclab.evaluation.engine.evaluate_retrieval`.

    ``metrics``: flat keys (``"cmc@1"``, ``"mAP"``, ``"mINP"``, ``"map@5"``, ``"precision@5"``, ``"knn_accuracy@1"``,
    ``"pcf@0.5"``, per category ``"<category>/cmc@1"`` ..., ``"n_queries"``, ``"n_queries_skipped"``).
    ``per_query``: one row per original query index: ``query_index``, ``valid``, ``first_hit_rank`` (1-based, 0 when
    invalid or no hit), ``ap``, ``inp`` (NaN when invalid), ``n_true`` (after exclusions), plus ``category`` when
    categories were given.
    ``topk_ids`` / ``topk_distances``: ``[Q, keep_top_k]`` nearest non-excluded gallery indices and their distances,
    nearest first, padded with -1 / inf. ``postprocess``: the post-processing the ranking comes from (`none`, or
    the chain as `metriclab.evaluation.postprocess.describe` writes it); the distances are then the re-ranked ones.
    ``verification``: the `metriclab.evaluation.verification.VerificationResult` when validation computed the
    verification metrics (`evaluate_validation`), for its pictures; None otherwise.
    """

    metrics: dict[str, float]
    per_query: pd.DataFrame
    topk_ids: np.ndarray
    topk_distances: np.ndarray
    distance: str
    backend: str
    postprocess: str = "none"
    verification: Any = None


class QueryState:
    """Per-query results, filled block by block by a backend."""

    def __init__(self, n_q: int, spec: RetrievalSpec):
        self.n_true = np.zeros(n_q, dtype=np.int64)
        self.first_hit_rank = np.zeros(n_q, dtype=np.int64)
        self.ap = np.full(n_q, np.nan)
        self.inp = np.full(n_q, np.nan)
        self.map_at_r = np.full(n_q, np.nan)
        self.r_precision = np.full(n_q, np.nan)
        self.map_at = {k: np.zeros(n_q) for k in spec.map_top_k}
        self.hits_at = {k: np.zeros(n_q, dtype=np.int64) for k in set(spec.precision_top_k) | set(spec.map_top_k)}
        self.knn_correct = {k: np.zeros(n_q, dtype=bool) for k in spec.knn_top_k}
        self.topk_ids = np.full((n_q, spec.keep_top_k), -1, dtype=np.int64)
        self.topk_distances = np.full((n_q, spec.keep_top_k), np.inf, dtype=np.float32)

    def add_ranks(self, lo: int, hi: int, rows: np.ndarray, k: np.ndarray, rank: np.ndarray, complete: bool) -> None:
        """Per-query numbers from the ranks of true matches (all of them when complete, else a ranking prefix)."""
        n_rows = hi - lo
        n_true = self.n_true[lo:hi]
        first = k == 0
        self.first_hit_rank[lo:hi][rows[first]] = rank[first]
        gain = (k + 1) / rank
        if complete:
            with np.errstate(invalid="ignore", divide="ignore"):
                self.ap[lo:hi] = np.bincount(rows, weights=gain, minlength=n_rows) / n_true
                last = k == n_true[rows] - 1
                hardest = np.zeros(n_rows)
                hardest[rows[last]] = rank[last]
                self.inp[lo:hi] = n_true / hardest
                # R = the query's number of true matches: precision within the first R, and MAP@R = the mean over
                # i <= R of precision@i at the true matches (pytorch-metric-learning's definitions)
                in_r = rank <= n_true[rows]
                self.r_precision[lo:hi] = np.bincount(rows[in_r], minlength=n_rows) / n_true
                self.map_at_r[lo:hi] = np.bincount(rows[in_r], weights=gain[in_r], minlength=n_rows) / n_true
        for kk, hits in self.hits_at.items():
            within = rank <= kk
            hits[lo:hi] = np.bincount(rows[within], minlength=n_rows)
            if kk in self.map_at:
                total = np.bincount(rows[within], weights=gain[within], minlength=n_rows)
                self.map_at[kk][lo:hi] = np.divide(total, hits[lo:hi], out=np.zeros(n_rows), where=hits[lo:hi] > 0)

    def add_topk(self, lo: int, hi: int, ids: np.ndarray, dists: np.ndarray, q_lab: np.ndarray,
                 g_lab: np.ndarray) -> None:
        """ids [B, depth] nearest first (-1 = none), dists matching: keep the top list and the kNN votes."""
        keep = min(self.topk_ids.shape[1], ids.shape[1])
        self.topk_ids[lo:hi, :keep] = ids[:, :keep]
        self.topk_distances[lo:hi, :keep] = dists[:, :keep]
        if self.knn_correct:
            valid = ids >= 0
            labels = np.where(valid, g_lab[np.maximum(ids, 0)], 0)
            for kk, correct in self.knn_correct.items():
                correct[lo:hi] = knn_correct(labels, valid, q_lab[lo:hi], kk)


def reduce_metrics(state: QueryState, valid: np.ndarray, spec: RetrievalSpec) -> dict[str, float]:
    """Means over the queries in `valid` (NaN when there are none); mAP / mINP only from the exact backend."""

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x[valid])) if valid.any() else float("nan")

    out: dict[str, float] = {}
    for k in spec.cmc_top_k:
        out[f"cmc@{k}"] = mean((state.first_hit_rank >= 1) & (state.first_hit_rank <= k))
    if spec.exact:
        out["mAP"] = mean(state.ap)
        out["mINP"] = mean(state.inp)
        out["map@r"] = mean(state.map_at_r)
        out["r_precision"] = mean(state.r_precision)
    for k in spec.map_top_k:
        out[f"map@{k}"] = mean(state.map_at[k])
    for k in spec.precision_top_k:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"precision@{k}"] = mean(state.hits_at[k] / np.minimum(k, state.n_true))
    for k in spec.knn_top_k:
        out[f"knn_accuracy@{k}"] = mean(state.knn_correct[k].astype(np.float64))
    return out


def warn_skipped(valid: np.ndarray, stacklevel: int) -> None:
    """Say how many queries have no valid true match (`stacklevel`: as warnings.warn, counted from the caller)."""
    if not valid.any():
        warnings.warn(
            "No query has a valid true match (same label in the gallery after exclusions); metrics are NaN",
            stacklevel=stacklevel + 1,
        )
    elif not valid.all():
        warnings.warn(f"{int((~valid).sum())} of {len(valid)} queries have no valid true match and are skipped",
                      stacklevel=stacklevel + 1)


def build_report(state: QueryState, spec: RetrievalSpec, pcf_values: Sequence[float], backend_name: str,
                 categories: Optional[np.ndarray]) -> RetrievalReport:
    """The report of a filled state: overall metrics, pcf, query counts, per-query rows and per-category metrics."""
    valid = state.n_true > 0
    n_q = len(valid)
    metrics = reduce_metrics(state, valid, spec)
    for v, value in zip(spec.pcf_variance, pcf_values):
        metrics[f"pcf@{v}"] = value
    metrics["n_queries"] = float(valid.sum())
    metrics["n_queries_skipped"] = float((~valid).sum())
    per_query = pd.DataFrame(
        {
            "query_index": np.arange(n_q, dtype=np.int64),
            "valid": valid,
            "first_hit_rank": np.where(valid, state.first_hit_rank, 0).astype(np.int64),
            "ap": np.where(valid, state.ap, np.nan),
            "inp": np.where(valid, state.inp, np.nan),
            "n_true": state.n_true.astype(np.int64),
        }
    )
    if categories is not None:
        per_query["category"] = categories
        for category in sorted(pd.unique(pd.Series(categories, dtype=object)), key=str):
            in_cat = np.asarray(categories == category, dtype=bool)
            for key, value in reduce_metrics(state, valid & in_cat, spec).items():
                metrics[f"{category}/{key}"] = value
            metrics[f"{category}/n_queries"] = float((valid & in_cat).sum())
            metrics[f"{category}/n_queries_skipped"] = float((~valid & in_cat).sum())
    return RetrievalReport(metrics=metrics, per_query=per_query, topk_ids=state.topk_ids,
                           topk_distances=state.topk_distances, distance=spec.distance, backend=backend_name,
                           postprocess=describe(spec.postprocess))


__all__ = ["PER_QUERY_COLUMNS", "PLAIN_PREFIX", "QueryState", "RetrievalReport", "build_report", "reduce_metrics",
           "warn_skipped"]
