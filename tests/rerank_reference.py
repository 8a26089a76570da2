"""Dense reference of k-reciprocal re-ranking (Zhong et al., CVPR 2017), written from the paper and the published
feature-based algorithm (`re_ranking(probFea, galFea, k1, k2, lambda_value)` of the re-ID baselines): N x N
matrices and Python loops over the items, for tests (small sizes) and for the benchmark's side-by-side run.

Deliberate choices, shared with metriclab.evaluation.rerank so the results can be compared exactly:
  - distances are float64 squared Euclidean distances between the features as given; for N <= `exact_up_to` as
    sum((a - b)^2) (the formula the implementation uses for the values it keeps), above it as |a|^2 + |b|^2 - 2ab
    in float64 over blocks (the benchmark's Market size: an N x N x D difference would not fit);
  - rows are ordered by a stable argsort (equal distances: lower index first);
  - a row whose maximum distance is 0 is divided by 1.
`v_dtype=np.float16` (default) stores V, its query-expanded copy, the Jaccard sums and distances in float16 as the
published code does; `np.float64` keeps everything in float64.
"""
from __future__ import annotations

import numpy as np


def dense_sqdist(x: np.ndarray, exact_up_to: int = 2048) -> np.ndarray:
    """float64 [N, N] squared Euclidean distances of the rows of x."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n <= exact_up_to:
        out = np.empty((n, n))
        for i in range(n):
            diff = x[i] - x
            out[i] = (diff * diff).sum(axis=1)
        return out
    sq = (x * x).sum(axis=1)
    out = np.empty((n, n))
    step = 1024
    for s in range(0, n, step):
        out[s:s + step] = sq[s:s + step, None] + sq[None, :] - 2.0 * (x[s:s + step] @ x.T)
    np.maximum(out, 0.0, out=out)
    return out


def k_reciprocal_neighbours(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the items among i's first k + 1 whose own first k + 1 contain i, in rank order."""
    forward = initial_rank[i, :k + 1]
    backward = initial_rank[forward, :k + 1]
    return forward[np.nonzero((backward == i).any(axis=1))[0]]


def rerank_dense_reference(q: np.ndarray, g: np.ndarray, k1: int = 20, k2: int = 6, lambda_value: float = 0.3,
                           v_dtype: type = np.float16, exact_up_to: int = 2048, return_parts: bool = False):
    """Final [Q, G] float64 re-ranked distances (and, with `return_parts`, a dict of the intermediate values:
    original_dist (row-normalised, N x N), initial_rank, reciprocal / expansion sets per item, V before and after
    local query expansion, the Jaccard distances [Q, N])."""
    q, g = np.asarray(q, dtype=np.float64), np.asarray(g, dtype=np.float64)
    n_q = len(q)
    feats = np.concatenate([q, g])
    n = len(feats)
    original = dense_sqdist(feats, exact_up_to)
    row_max = original.max(axis=1)
    original /= np.where(row_max > 0, row_max, 1.0)[:, None]  # row i / its maximum (symmetric distances)
    initial_rank = np.empty((n, n), dtype=np.int32)
    for s in range(0, n, 1024):
        initial_rank[s:s + 1024] = np.argsort(original[s:s + 1024], axis=1, kind="stable")
    half = int(np.around(k1 / 2))

    v = np.zeros((n, n), dtype=v_dtype)
    reciprocal, expansion = [], []
    for i in range(n):
        rec = k_reciprocal_neighbours(initial_rank, i, k1)
        exp_index = rec
        for cand in rec:
            cand_rec = k_reciprocal_neighbours(initial_rank, cand, half)
            if len(np.intersect1d(cand_rec, rec)) > 2 / 3 * len(cand_rec):
                exp_index = np.append(exp_index, cand_rec)
        exp_index = np.unique(exp_index)
        weight = np.exp(-original[i, exp_index])
        v[i, exp_index] = weight / np.sum(weight)
        if return_parts:
            reciprocal.append(np.sort(rec))
            expansion.append(exp_index)
    v_before = v.copy() if return_parts else None
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
        v = v_qe
        del v_qe
    inv_index = [np.nonzero(v[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros((n_q, n), dtype=v_dtype)
    for i in range(n_q):
        temp_min = np.zeros(n, dtype=v_dtype)
        nonzero = np.nonzero(v[i] != 0)[0]
        for j in nonzero:
            rows = inv_index[j]
            temp_min[rows] = temp_min[rows] + np.minimum(v[i, j], v[rows, j])
        jaccard[i] = 1 - temp_min / (2 - temp_min)
    final = jaccard[:, n_q:] * (1 - lambda_value) + original[:n_q, n_q:] * lambda_value
    if not return_parts:
        return final
    return final, dict(original_dist=original, initial_rank=initial_rank, reciprocal=reciprocal,
                       expansion=expansion, v_before=v_before, v=v, jaccard=jaccard)
