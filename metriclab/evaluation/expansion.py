"""Embedding-level post-processing before retrieval: query expansion and database-side augmentation.

- `average_query_expansion` (AQE; Chum, Philbin, Sivic, Isard, Zisserman, ICCV 2007),
- `alpha_query_expansion` (alpha-QE; Radenovic, Tolias, Chum, TPAMI 2018),
- `database_augmentation` (DBA; Arandjelovic & Zisserman, CVPR 2012; Gordo, Almazan, Revaud, Larlus, IJCV 2017).

All three work on cosine similarity: inputs are unit-normalised copies (a zero vector stays zero), neighbours are
the k most similar gallery items, and the returned embeddings are unit length (float32 CPU tensors). Equal
similarities rank the lower gallery index first. Neighbours come from blocked products (one block of float32
similarities <= `block_bytes`, 64 MB) and `torch.topk`, never the whole Q x G matrix; the weighted sums are taken
in row blocks of the same size.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F

EXTRA_CANDIDATES = 8  # candidates fetched beyond k, so equal similarities can be put in index order


def _check_k(k: int, n_gallery: int, limit: int, what: str) -> None:
    if n_gallery < 2:
        raise ValueError(f"query expansion/DBA needs a gallery of at least 2 items, got {n_gallery}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ValueError(f"k must be an integer, got {k!r}")
    if not 1 <= k <= limit:
        raise ValueError(f"k must be in [1, {limit}] ({what}), got {k}")


def _check_alpha(alpha: float) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")


def _unit(x: torch.Tensor) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, D], got shape {tuple(x.shape)}")
    return F.normalize(x.detach().to(torch.float32), dim=1)


def _top_k(q: torch.Tensor, g: torch.Tensor, k: int, exclude_self: bool, block_bytes: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(similarities, indices) [len(q), k] of the k most similar rows of g for every row of q (unit rows), most
    similar first, equal similarities in index order; `exclude_self`: q is g, and row i never lists item i."""
    n_q, n_g = len(q), len(g)
    n_fetch = min(n_g, k + EXTRA_CANDIDATES + (1 if exclude_self else 0))
    sims = torch.empty((n_q, k), dtype=torch.float32)
    idx = torch.empty((n_q, k), dtype=torch.int64)
    step = max(1, block_bytes // (4 * n_g))
    for s in range(0, n_q, step):
        e = min(n_q, s + step)
        block = q[s:e] @ g.T
        if exclude_self:
            block[torch.arange(e - s), torch.arange(s, e)] = -math.inf
        vals, cand = torch.topk(block, n_fetch, dim=1, largest=True, sorted=True)
        # order the fetched candidates by (similarity desc, index asc)
        order = torch.sort(cand, dim=1, stable=True).indices
        vals, cand = vals.gather(1, order), cand.gather(1, order)
        order = torch.sort(vals, dim=1, descending=True, stable=True).indices
        vals, cand = vals.gather(1, order), cand.gather(1, order)
        if n_fetch < n_g:
            # a row whose k-th similarity equals the last fetched one may have equal items left out: sort it all
            unsure = (vals[:, k - 1] == vals[:, -1]).nonzero().flatten()
            for r in unsure.tolist():
                row_vals, row_idx = torch.sort(block[r], descending=True, stable=True)
                vals[r, :k], cand[r, :k] = row_vals[:k], row_idx[:k]
        sims[s:e], idx[s:e] = vals[:, :k], cand[:, :k]
    return sims, idx


def _expand(base: torch.Tensor, gu: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, block_bytes: int
            ) -> torch.Tensor:
    """normalise(base[i] + sum_j weights[i, j] * gu[idx[i, j]]) for every row i, in row blocks."""
    out = torch.empty_like(base)
    step = max(1, block_bytes // (4 * max(1, idx.shape[1] * base.shape[1])))
    for s in range(0, len(base), step):
        e = min(len(base), s + step)
        summed = base[s:e] + (weights[s:e].unsqueeze(2) * gu[idx[s:e]]).sum(dim=1)
        out[s:e] = F.normalize(summed, dim=1)
    return out


def average_query_expansion(q: torch.Tensor, g: torch.Tensor, k: int, block_bytes: int = 64 << 20
                            ) -> torch.Tensor:
    """AQE: each query becomes the unit-normalised mean of its unit embedding and the unit embeddings of its k
    most cosine-similar gallery items. q [Q, D], g [G, D] float32; returns the new queries [Q, D] (unit length);
    1 <= k <= G, G >= 2."""
    _check_k(k, len(g), len(g), "the gallery size")
    qu, gu = _unit(q), _unit(g)
    _, idx = _top_k(qu, gu, k, exclude_self=False, block_bytes=block_bytes)
    ones = torch.ones(idx.shape, dtype=torch.float32)  # the mean's 1 / (k + 1) disappears in the normalisation
    return _expand(qu, gu, ones, idx, block_bytes)


def alpha_query_expansion(q: torch.Tensor, g: torch.Tensor, k: int, alpha: float, block_bytes: int = 64 << 20
                          ) -> torch.Tensor:
    """alpha-QE: q' = normalise(q_unit + sum over the k most cosine-similar gallery items of
    max(sim, 0)^alpha * g_unit) (the query's own weight is 1 = 1^alpha; alpha = 0 gives every neighbour weight 1,
    which is AQE). q [Q, D], g [G, D] float32; returns the new queries [Q, D] (unit length); 1 <= k <= G,
    alpha >= 0, G >= 2."""
    _check_k(k, len(g), len(g), "the gallery size")
    _check_alpha(alpha)
    qu, gu = _unit(q), _unit(g)
    sims, idx = _top_k(qu, gu, k, exclude_self=False, block_bytes=block_bytes)
    weights = sims.clamp(min=0.0).pow(float(alpha))  # 0^0 = 1: alpha = 0 weighs every neighbour 1
    return _expand(qu, gu, weights, idx, block_bytes)


def database_augmentation(g: torch.Tensor, k: int, alpha: float = 0.0, block_bytes: int = 64 << 20
                          ) -> torch.Tensor:
    """DBA: each gallery item becomes normalise(g_unit + sum over its k most cosine-similar other gallery items of
    max(sim, 0)^alpha * their g_unit); alpha = 0 (default) weighs every neighbour 1, i.e. the plain mean of
    Arandjelovic & Zisserman; alpha > 0 is Gordo et al.'s weighted version. g [G, D] float32; returns the new
    gallery [G, D] (unit length); 1 <= k <= G - 1, G >= 2. Apply the same query expansion to the queries after it
    if wanted (this function does not touch them)."""
    _check_k(k, len(g), len(g) - 1, "the gallery size minus the item itself")
    _check_alpha(alpha)
    gu = _unit(g)
    sims, idx = _top_k(gu, gu, k, exclude_self=True, block_bytes=block_bytes)
    weights = sims.clamp(min=0.0).pow(float(alpha))  # 0^0 = 1: alpha = 0 weighs every neighbour 1
    return _expand(gu, gu, weights, idx, block_bytes)
