"""Exact retrieval and re-ID metrics for query vs gallery embeddings, computed in query blocks.

Why our own engine: OML's full-gallery mAP (the number re-ID papers report) builds the whole Q×G distance matrix
and keeps G retrieved items per query (+2 GB, 30-70 s on Market under load) and it averages in queries that have no
valid true match; torchreid's evaluation is slow Python. Here every block of queries gets its distances from one
matrix product, ranks are computed inside the block, and only per-query numbers are kept.

Definitions (all exact; ``rank`` is 1-based, in the ranking of the non-excluded gallery items of a query):

- excluded pairs: the same dataset row (``query_ids[i] == gallery_ids[j]``) and the same sequence
  (``query_sequences[i] == gallery_sequences[j]``, e.g. Market ``"<pid>_c<cam>"``). Excluded items are neither true
  matches nor negatives and never appear in ``topk_ids``. A missing sequence (None/NaN) belongs to no sequence
  (OML puts all missing values into ONE sequence; we do not).
- true match: a non-excluded gallery item with the query's label; ``n_true`` counts them. A query with ``n_true == 0``
  is invalid: skipped from every average and counted in ``n_queries_skipped`` (torchreid / re-ID convention).
- ties in distance are ranked pessimistically: within a group of equal distances the wrong items come before the true
  matches (a collapsed model that maps everything to one point gets the worst score, not an index-order lottery);
  among items of the same kind the lower gallery index comes first (visible only in ``topk_ids``).
- ``cmc@k``: the first true match has rank <= k.
- ``mAP``: mean over valid queries of AP = (1/n_true) * sum_i i / rank_i over ALL true matches (re-ID mAP).
- ``mINP``: mean over valid queries of n_true / rank of the hardest (last) true match ("Deep Learning for Person
  Re-identification: A Survey and Outlook", as in torchreid / fast-reid).
- ``map@k`` (OML): (1/h_k) * sum_{i: rank_i <= k} i / rank_i with h_k = true matches within the top k; 0 when h_k = 0.
- ``precision@k`` (OML): h_k / min(k, n_true).
- ``knn_accuracy@k``: the majority label of the k nearest non-excluded gallery items (in the ranking above, so a
  tie at the k-th place lets the wrong items in first) equals the query label; a tie in votes between labels goes to
  the label that occurs nearest to the query.
- ``pcf@v``: OML's principal-components fraction over the query + gallery embeddings (a row that is both query and
  gallery, by id, is counted once).

Numerics: embeddings are used as float32 on CPU. Euclidean ranks by ``|g|^2 - 2 q.g`` (the row constant ``|q|^2``
cannot change a ranking; ``topk_distances`` add it back); cosine ranks by ``1 - q.g`` of unit-normalised copies.

Backends: ``"exact"`` (default) gives everything. ``"faiss-flat"`` (exact search) and ``"faiss-hnsw"``
(approximate) give only the top-k metrics (cmc, map@k, precision@k, knn accuracy); ``mAP``/``mINP`` are left out of
``metrics`` and ``ap``/``inp`` are NaN, because they need the whole ranking. With faiss, ties keep faiss' order and
``first_hit_rank`` is 0 when the first true match lies deeper than the searched list.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import pandas as pd
import torch
from oml.functional.metrics import calc_pcf
from metriclab.core.compat import oml_principal_axes

DISTANCES = ("euclidean", "cosine")
BACKENDS = ("exact", "faiss-flat", "faiss-hnsw")

# Default block: the distances of one block of queries stay within this many bytes (float32).
BLOCK_BYTES = 64 * 2**20
# A block is also cut so that its (query, gallery) true-match / exclusion pairs stay bounded (few labels, big
# galleries).
PAIR_BUDGET = 2_000_000
# Rows of embeddings per chunk in whole-matrix passes (squared norms, pcf covariance, finiteness report).
_PCF_CHUNK_ROWS = 8192

PER_QUERY_COLUMNS = ("query_index", "valid", "first_hit_rank", "ap", "inp", "n_true")


@dataclass
class RetrievalReport:
    """Result of :func:`evaluate_retrieval`.

    ``metrics``: flat keys (``"cmc@1"``, ``"mAP"``, ``"mINP"``, ``"map@5"``, ``"precision@5"``, ``"knn_accuracy@1"``,
    ``"pcf@0.5"``, per category ``"<category>/cmc@1"`` ..., ``"n_queries"``, ``"n_queries_skipped"``).
    ``per_query``: one row per original query index: ``query_index``, ``valid``, ``first_hit_rank`` (1-based, 0 when
    invalid or no hit), ``ap``, ``inp`` (NaN when invalid), ``n_true`` (after exclusions), plus ``category`` when
    categories were given.
    ``topk_ids`` / ``topk_distances``: ``[Q, keep_top_k]`` nearest non-excluded gallery indices and their distances,
    nearest first, padded with -1 / inf.
    """

    metrics: dict[str, float]
    per_query: pd.DataFrame
    topk_ids: np.ndarray
    topk_distances: np.ndarray
    distance: str
    backend: str


# ----------------------------------------------------------------------------------------------------------------------
# input checks


def _as_embeddings(x: Any, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument name
            raise TypeError(f"{name} must be a torch.Tensor or numpy array of floats, got {type(x).__name__}") from e
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): evaluation needs at least one item on each side")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns: embeddings need at least one dimension")
    t = t.to(torch.float32).contiguous()
    low, high = (float(v) for v in torch.aminmax(t))  # one pass, no copy: NaN propagates, inf shows
    if not (math.isfinite(low) and math.isfinite(high)):
        finite_rows = torch.cat([torch.isfinite(c).all(dim=1) for c in t.split(_PCF_CHUNK_ROWS)])
        bad = torch.nonzero(~finite_rows).flatten()[:5].tolist()
        raise ValueError(
            f"{name} has NaN/inf values in rows {bad} (first shown of {int((~finite_rows).sum())}); "
            "fix the model/embeddings (e.g. a diverged checkpoint) before evaluating"
        )
    # |q - g|^2 must stay finite in float32 (an inf distance would read as an excluded pair)
    limit = math.sqrt(torch.finfo(torch.float32).max / (4 * t.shape[1]))
    if max(-low, high) > limit:
        raise ValueError(
            f"{name} has values up to {max(-low, high):.3g}; float32 distances overflow above {limit:.3g} "
            f"for dim {t.shape[1]}: rescale the embeddings"
        )
    return t


def _to_numpy_1d(x: Any, name: str, n: int, side: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    elif isinstance(x, (pd.Series, pd.Index)):
        arr = x.to_numpy()
    else:
        arr = np.asarray(x) if not isinstance(x, (list, tuple)) else np.asarray(x, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per {side} item), got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but {side}_embeddings has {n} rows; they must match")
    return arr


def _as_labels(x: Any, name: str, n: int, side: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"{name} is required (one integer label per {side} item)")
    arr = _to_numpy_1d(x, name, n, side)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be integers, got non-numeric values such as {arr[:3].tolist()}") from e
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return arr.astype(np.int64)
    raise TypeError(f"{name} must be integers, got dtype {arr.dtype} (e.g. {arr[:3].tolist()})")


def _joint_codes(q_values: np.ndarray, g_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Factorize query and gallery values together; missing values (None/NaN) get -1 (= match nothing)."""
    values = np.concatenate([np.asarray(q_values, dtype=object), np.asarray(g_values, dtype=object)])
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    codes = codes.astype(np.int64)
    return codes[: len(q_values)], codes[len(q_values) :], len(uniques)


def _check_ks(ks: Any, name: str) -> tuple[int, ...]:
    if ks is None:
        return ()
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must contain positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _check_pcf_variance(values: Any) -> tuple[float, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(float(v) for v in values)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"pcf_variance must contain fractions in [0, 1], got {values}")
    return values


# ----------------------------------------------------------------------------------------------------------------------
# (query, gallery) pairs that share a key, without a Q×G mask


class _PairIndex:
    """Gallery items grouped by a code, so the pairs of a query block that share a code are built sparsely."""

    def __init__(self, query_codes: np.ndarray, gallery_codes: np.ndarray, n_codes: int):
        self.order = np.argsort(gallery_codes, kind="stable")
        n_missing = int((gallery_codes < 0).sum())
        counts = np.bincount(gallery_codes[gallery_codes >= 0], minlength=max(n_codes, 1))
        starts = n_missing + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        has = query_codes >= 0
        self.query_counts = np.where(has, counts[np.where(has, query_codes, 0)], 0).astype(np.int64)
        self.query_starts = np.where(has, starts[np.where(has, query_codes, 0)], 0).astype(np.int64)

    def pairs(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(row within block, gallery index) of every pair of queries lo..hi-1, grouped by row."""
        counts = self.query_counts[lo:hi]
        total = int(counts.sum())
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), counts)
        row_first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(row_first, counts)
        cols = self.order[np.repeat(self.query_starts[lo:hi], counts) + within]
        return rows, cols


def _plan_blocks(n_q: int, n_g: int, block_size: Optional[int], pair_counts: np.ndarray) -> list[tuple[int, int]]:
    if block_size is None:
        max_rows = max(1, BLOCK_BYTES // (4 * n_g))
    else:
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
        max_rows = int(block_size)
    cum = np.concatenate([[0], np.cumsum(pair_counts)])
    blocks = []
    lo = 0
    while lo < n_q:
        hi = min(lo + max_rows, n_q)
        limit = int(np.searchsorted(cum, cum[lo] + PAIR_BUDGET, side="right")) - 1
        hi = max(lo + 1, min(hi, limit))
        blocks.append((lo, hi))
        lo = hi
    return blocks


# ----------------------------------------------------------------------------------------------------------------------
# per-block computations


def _count_le_in_sorted_rows(sorted_rows: np.ndarray, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """For each (row, value): how many entries of sorted_rows[row] are <= value (vectorised binary search)."""
    n_cols = sorted_rows.shape[1]
    flat = sorted_rows.reshape(-1)
    base = rows * n_cols
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), n_cols, dtype=np.int64)
    for _ in range(int(math.ceil(math.log2(n_cols + 1))) + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1
        go_right = flat[base + np.minimum(mid, n_cols - 1)] <= values
        lo = np.where(active & go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
    return lo


def _pessimistic_ranks(
    rows: np.ndarray, values: np.ndarray, sorted_rows: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the true matches (rows, their distance keys) given each row's sorted keys of all non-excluded items.

    Returns rows, k (0-based position among the row's true matches) and rank (1-based), grouped by row, k ascending.
    rank_k = (k + 1) + #wrong items with key <= key_k (wrong items first in ties).
    """
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    n = len(rows)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    row_counts = np.bincount(rows, minlength=sorted_rows.shape[0])
    row_first = np.cumsum(row_counts) - row_counts
    k = np.arange(n, dtype=np.int64) - row_first[rows]
    # true matches with key <= own key (the whole tie group of true matches counts)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    group_id = np.cumsum(new_group) - 1
    group_end = np.append(np.flatnonzero(new_group)[1:], n)
    true_le = group_end[group_id] - row_first[rows]
    all_le = _count_le_in_sorted_rows(sorted_rows, rows, values)
    rank = all_le - true_le + k + 1
    return rows, k, rank


def _order_topk(
    vals: np.ndarray, ids: np.ndarray, is_true: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by (distance, wrong-before-true, gallery index): the pessimistic rule within ties."""
    n_rows, k = vals.shape
    row_ids = np.repeat(np.arange(n_rows), k)
    order = np.lexsort((ids.ravel(), is_true.ravel(), vals.ravel(), row_ids)).reshape(n_rows, k)
    order -= (np.arange(n_rows) * k)[:, None]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(ids, order, 1)


def _knn_correct(top_labels: np.ndarray, top_valid: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
    """Majority vote of the first k valid labels; among tied labels the one occurring nearest wins."""
    n_rows = top_labels.shape[0]
    k = min(k, top_labels.shape[1])
    out = np.zeros(n_rows, dtype=bool)
    chunk = max(1, 16_000_000 // max(1, k * k))
    for a in range(0, n_rows, chunk):
        lab = top_labels[a : a + chunk, :k]
        ok = top_valid[a : a + chunk, :k]
        # votes[i, p] = how many of the first k valid items share the label at position p
        same = (lab[:, :, None] == lab[:, None, :]) & ok[:, None, :] & ok[:, :, None]
        votes = same.sum(2)
        winner = votes.argmax(1)  # first max = the nearest among tied labels
        predicted = lab[np.arange(len(lab)), winner]
        has_any = ok.any(1)
        out[a : a + chunk] = has_any & (predicted == query_labels[a : a + chunk])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# pcf


def _pcf(sources: list[torch.Tensor], pcf_variance: tuple[float, ...]) -> list[float]:
    """OML's principal-components fraction of the rows of all sources together."""
    n = sum(len(s) for s in sources)
    dim = sources[0].shape[1]
    if n <= 2 * dim:
        return [float(v) for v in calc_pcf(torch.cat(sources), pcf_variance)]
    # OML's calc_pcf runs an SVD of the whole N×D matrix (3-4 s at Market size). The explained-variance ratios are the
    # covariance eigenvalues, so we get them from a chunked D×D covariance and let OML's PCA count the components.
    chunks = [s[a : a + _PCF_CHUNK_ROWS] for s in sources for a in range(0, len(s), _PCF_CHUNK_ROWS)]
    mean = (sum(c.sum(0).double() for c in chunks) / n).float()
    # torch's matmul, not scipy's syrk: a second BLAS thread pool fights torch's for the 2 cores under load
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    for c in chunks:
        centred = c - mean
        gram += (centred.T @ centred).double()
    try:
        # numpy's LAPACK: torch's threaded eigvalsh took 1-6 s (not 20 ms) on the shared 2-core machine
        eigenvalues = np.linalg.eigvalsh(gram.numpy())
    except np.linalg.LinAlgError:  # calc_pcf's behaviour: a degenerate matrix gives NaN, not a crash
        return [float("nan")] * len(pcf_variance)
    variance = torch.from_numpy(eigenvalues).clamp(min=0).flip(0)  # descending
    # float32 ratios, as calc_pcf on float32 input
    n_components = oml_principal_axes((variance / variance.sum()).float(), pcf_variance)
    return [float(v) for v in n_components / dim]


# ----------------------------------------------------------------------------------------------------------------------
# the engine


def evaluate_retrieval(
    query_embeddings: Any,
    gallery_embeddings: Any,
    query_labels: Any,
    gallery_labels: Any,
    *,
    query_ids: Any = None,
    gallery_ids: Any = None,
    query_sequences: Any = None,
    gallery_sequences: Any = None,
    query_categories: Any = None,
    cmc_top_k: Sequence[int] = (1, 5, 10),
    map_top_k: Sequence[int] = (5,),
    precision_top_k: Sequence[int] = (5,),
    knn_top_k: Sequence[int] = (1,),
    pcf_variance: Sequence[float] = (0.5,),
    distance: str = "euclidean",
    block_size: Optional[int] = None,
    keep_top_k: int = 10,
    backend: str = "exact",
    hnsw_m: int = 32,
    hnsw_ef_construction: int = 200,
    hnsw_ef_search: int = 256,
) -> RetrievalReport:
    """Exact retrieval / re-ID metrics of queries against a gallery; see the module docstring for definitions.

    Distances: ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity). Work is done in blocks of ``block_size``
    queries (None: a block's float32 distances stay within ~64 MB), so memory stays bounded as the gallery grows.
    ``backend``: ``"exact"``, ``"faiss-flat"`` (exact search, top-k metrics only) or ``"faiss-hnsw"`` (approximate,
    top-k metrics only; ``hnsw_m``, ``hnsw_ef_construction``, ``hnsw_ef_search`` are its parameters).
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    q_emb = _as_embeddings(query_embeddings, "query_embeddings")
    g_emb = _as_embeddings(gallery_embeddings, "gallery_embeddings")
    n_q, n_g = q_emb.shape[0], g_emb.shape[0]
    if q_emb.shape[1] != g_emb.shape[1]:
        raise ValueError(
            f"query_embeddings has dim {q_emb.shape[1]} but gallery_embeddings has dim {g_emb.shape[1]}; "
            "both must come from the same model"
        )
    q_lab = _as_labels(query_labels, "query_labels", n_q, "query")
    g_lab = _as_labels(gallery_labels, "gallery_labels", n_g, "gallery")
    cmc_top_k = _check_ks(cmc_top_k, "cmc_top_k")
    map_top_k = _check_ks(map_top_k, "map_top_k")
    precision_top_k = _check_ks(precision_top_k, "precision_top_k")
    knn_top_k = _check_ks(knn_top_k, "knn_top_k")
    pcf_variance = _check_pcf_variance(pcf_variance)
    if isinstance(keep_top_k, bool) or not isinstance(keep_top_k, (int, np.integer)) or keep_top_k < 0:
        raise ValueError(f"keep_top_k must be a non-negative integer, got {keep_top_k!r}")
    keep_top_k = int(keep_top_k)

    excluders: list[_PairIndex] = []
    q_ids_arr = g_ids_arr = None
    for q_vals, g_vals, q_name, g_name in (
        (query_ids, gallery_ids, "query_ids", "gallery_ids"),
        (query_sequences, gallery_sequences, "query_sequences", "gallery_sequences"),
    ):
        if (q_vals is None) != (g_vals is None):
            given, missing = (q_name, g_name) if q_vals is not None else (g_name, q_name)
            raise ValueError(f"{given} was given without {missing}; pass both (or neither)")
        if q_vals is None:
            continue
        q_arr = _to_numpy_1d(q_vals, q_name, n_q, "query")
        g_arr = _to_numpy_1d(g_vals, g_name, n_g, "gallery")
        if q_name == "query_ids":
            q_ids_arr, g_ids_arr = q_arr, g_arr
        excluders.append(_PairIndex(*_joint_codes(q_arr, g_arr)))
    categories = None
    if query_categories is not None:
        categories = _to_numpy_1d(query_categories, "query_categories", n_q, "query")
        if pd.isna(pd.Series(categories, dtype=object)).any():
            raise ValueError("query_categories has missing values (None/NaN); give every query a category")

    lab_q_codes, lab_g_codes, n_lab = _joint_codes(q_lab, g_lab)
    positives = _PairIndex(lab_q_codes, lab_g_codes, n_lab)
    excl_counts = sum((e.query_counts for e in excluders), np.zeros(n_q, dtype=np.int64))  # excluded pairs per query
    blocks = _plan_blocks(n_q, n_g, block_size, positives.query_counts + excl_counts)

    state = _State(n_q, keep_top_k, map_top_k, precision_top_k, knn_top_k)
    if backend == "exact":
        _run_exact(q_emb, g_emb, q_lab, g_lab, positives, excluders, blocks, distance, keep_top_k, knn_top_k, state)
        backend_name = "exact"
    else:
        depth = max([keep_top_k, *cmc_top_k, *map_top_k, *precision_top_k, *knn_top_k, 1])
        backend_name = _run_faiss(
            q_emb, g_emb, q_lab, g_lab, positives, excluders, excl_counts, blocks, distance, depth, state,
            backend, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
        )

    pcf_values: list[float] = []
    if pcf_variance:
        sources = [g_emb]
        if q_ids_arr is not None:
            q_only = ~pd.Series(q_ids_arr, dtype=object).isin(set(g_ids_arr.tolist())).to_numpy()
            sources.insert(0, q_emb[torch.from_numpy(q_only)])
        else:
            sources.insert(0, q_emb)
        pcf_values = _pcf([s for s in sources if len(s)], pcf_variance)

    exact = backend == "exact"
    valid = state.n_true > 0
    metrics = _reduce(state, valid, cmc_top_k, map_top_k, precision_top_k, knn_top_k, exact)
    for v, value in zip(pcf_variance, pcf_values):
        metrics[f"pcf@{v}"] = value
    metrics["n_queries"] = float(valid.sum())
    metrics["n_queries_skipped"] = float((~valid).sum())
    if not valid.any():
        warnings.warn(
            "No query has a valid true match (same label in the gallery after exclusions); metrics are NaN",
            stacklevel=2,
        )
    elif not valid.all():
        warnings.warn(f"{int((~valid).sum())} of {n_q} queries have no valid true match and are skipped", stacklevel=2)

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
            sub = _reduce(state, valid & in_cat, cmc_top_k, map_top_k, precision_top_k, knn_top_k, exact)
            for key, value in sub.items():
                metrics[f"{category}/{key}"] = value
            metrics[f"{category}/n_queries"] = float((valid & in_cat).sum())
            metrics[f"{category}/n_queries_skipped"] = float((~valid & in_cat).sum())

    return RetrievalReport(
        metrics=metrics,
        per_query=per_query,
        topk_ids=state.topk_ids,
        topk_distances=state.topk_distances,
        distance=distance,
        backend=backend_name,
    )


class _State:
    """Per-query results, filled block by block."""

    def __init__(self, n_q: int, keep_top_k: int, map_top_k, precision_top_k, knn_top_k):
        self.n_true = np.zeros(n_q, dtype=np.int64)
        self.first_hit_rank = np.zeros(n_q, dtype=np.int64)
        self.ap = np.full(n_q, np.nan)
        self.inp = np.full(n_q, np.nan)
        self.map_at = {k: np.zeros(n_q) for k in map_top_k}
        self.hits_at = {k: np.zeros(n_q, dtype=np.int64) for k in set(precision_top_k) | set(map_top_k)}
        self.knn_correct = {k: np.zeros(n_q, dtype=bool) for k in knn_top_k}
        self.topk_ids = np.full((n_q, keep_top_k), -1, dtype=np.int64)
        self.topk_distances = np.full((n_q, keep_top_k), np.inf, dtype=np.float32)

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
        for kk, hits in self.hits_at.items():
            within = rank <= kk
            hits[lo:hi] = np.bincount(rows[within], minlength=n_rows)
            if kk in self.map_at:
                total = np.bincount(rows[within], weights=gain[within], minlength=n_rows)
                self.map_at[kk][lo:hi] = np.divide(total, hits[lo:hi], out=np.zeros(n_rows), where=hits[lo:hi] > 0)

    def add_topk(self, lo: int, hi: int, ids: np.ndarray, dists: np.ndarray, q_lab: np.ndarray, g_lab: np.ndarray):
        """ids [B, depth] nearest first (-1 = none), dists matching: keep the top list and the kNN votes."""
        keep = min(self.topk_ids.shape[1], ids.shape[1])
        self.topk_ids[lo:hi, :keep] = ids[:, :keep]
        self.topk_distances[lo:hi, :keep] = dists[:, :keep]
        if self.knn_correct:
            valid = ids >= 0
            labels = np.where(valid, g_lab[np.maximum(ids, 0)], 0)
            for kk, correct in self.knn_correct.items():
                correct[lo:hi] = _knn_correct(labels, valid, q_lab[lo:hi], kk)


def _reduce(state: _State, valid, cmc_top_k, map_top_k, precision_top_k, knn_top_k, exact: bool) -> dict:
    """Means over the queries in `valid` (NaN when there are none)."""

    def mean(x: np.ndarray) -> float:
        return float(np.mean(x[valid])) if valid.any() else float("nan")

    out: dict[str, float] = {}
    for k in cmc_top_k:
        out[f"cmc@{k}"] = mean((state.first_hit_rank >= 1) & (state.first_hit_rank <= k))
    if exact:
        out["mAP"] = mean(state.ap)
        out["mINP"] = mean(state.inp)
    for k in map_top_k:
        out[f"map@{k}"] = mean(state.map_at[k])
    for k in precision_top_k:
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"precision@{k}"] = mean(state.hits_at[k] / np.minimum(k, state.n_true))
    for k in knn_top_k:
        out[f"knn_accuracy@{k}"] = mean(state.knn_correct[k].astype(np.float64))
    return out


def _block_pairs(index: _PairIndex, lo: int, hi: int, n_g: int) -> np.ndarray:
    rows, cols = index.pairs(lo, hi)
    return rows * n_g + cols


def _run_exact(q_emb, g_emb, q_lab, g_lab, positives, excluders, blocks, distance, keep_top_k, knn_top_k, state):
    n_g = g_emb.shape[0]
    if distance == "cosine":
        q_side = -_unit_rows(q_emb, "query_embeddings")  # key = -cos: ascending key = ascending 1 - cos
        g_side = _unit_rows(g_emb, "gallery_embeddings")
        bias = None
    else:
        q_side, g_side = q_emb, g_emb
        bias = _squared_norms(g_emb)[None, :]  # key = |g|^2 - 2 q.g: the row constant |q|^2 cannot change a ranking
        q_sqnorm = _squared_norms(q_emb).numpy()
    g_side_t = g_side.T
    max_rows = max(hi - lo for lo, hi in blocks)
    buffer = torch.empty(max_rows, n_g, dtype=torch.float32)
    depth = min(max([keep_top_k, *knn_top_k, 0]), n_g)
    n_threads = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(n_threads) as pool:
        for lo, hi in blocks:
            n_rows = hi - lo
            key_t = buffer[:n_rows]
            if bias is None:
                torch.mm(q_side[lo:hi], g_side_t, out=key_t)
            else:
                torch.addmm(bias, q_side[lo:hi], g_side_t, beta=1, alpha=-2, out=key_t)
            key = key_t.numpy()
            flat_key = key.reshape(-1)
            for index in excluders:
                flat_key[_block_pairs(index, lo, hi, n_g)] = np.inf
            pos_rows, pos_cols = positives.pairs(lo, hi)
            pos_keys = flat_key[pos_rows * n_g + pos_cols]
            not_excluded = np.isfinite(pos_keys)
            pos_rows, pos_keys = pos_rows[not_excluded], pos_keys[not_excluded]
            state.n_true[lo:hi] = np.bincount(pos_rows, minlength=n_rows)

            if depth > 0:
                ids, keys = _exact_topk(key_t, depth, q_lab[lo:hi], g_lab)
                if distance == "cosine":
                    dists = 1.0 + keys
                else:
                    dists = np.sqrt(np.maximum(keys + q_sqnorm[lo:hi, None], 0.0))
                dists = np.where(ids >= 0, dists, np.inf).astype(np.float32)
                state.add_topk(lo, hi, ids, dists, q_lab, g_lab)

            # full ranking: sort each row in place (numpy's SIMD sort, rows split across threads)
            bounds = np.linspace(0, n_rows, min(n_threads, n_rows) + 1).astype(int)
            list(pool.map(lambda ab: key[ab[0] : ab[1]].sort(axis=1), zip(bounds[:-1], bounds[1:])))
            rows, k, rank = _pessimistic_ranks(pos_rows, pos_keys, key)
            state.add_ranks(lo, hi, rows, k, rank, complete=True)


def _squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row sums of squares, in chunks so no N×D temporary is made."""
    return torch.cat([(c * c).sum(1) for c in x.split(_PCF_CHUNK_ROWS)])


def _unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    norms = torch.linalg.vector_norm(x, dim=1)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms == 0).flatten()[:5].tolist()
        raise ValueError(f"{name} rows {bad} have zero norm: cosine distance is undefined for them")
    return x / norms[:, None]


def _exact_topk(key_t: torch.Tensor, depth: int, q_lab: np.ndarray, g_lab: np.ndarray):
    """Top-`depth` gallery ids per row under the pessimistic tie rule, exact also when ties cross the cut."""
    n_rows, n_g = key_t.shape
    search = min(depth + 1, n_g)
    vals_t, ids_t = torch.topk(key_t, search, dim=1, largest=False, sorted=True)
    vals, ids = vals_t.numpy(), ids_t.numpy().astype(np.int64)
    if search > depth:
        cut_tie = (vals[:, depth - 1] == vals[:, depth]) & np.isfinite(vals[:, depth - 1])
    else:
        cut_tie = np.zeros(n_rows, dtype=bool)
    vals, ids = vals[:, :depth].copy(), ids[:, :depth].copy()
    is_true = g_lab[ids] == q_lab[:, None]
    vals, ids = _order_topk(vals, ids, is_true)
    key = key_t.numpy()
    for r in np.flatnonzero(cut_tie):
        # the tie group at the cut is larger than the list: collect all of it, then apply the rule
        cand = np.flatnonzero(key[r] <= vals[r, depth - 1])
        cand_true = g_lab[cand] == q_lab[r]
        order = np.lexsort((cand, cand_true, key[r, cand]))[:depth]
        vals[r], ids[r] = key[r, cand[order]], cand[order]
    ids[~np.isfinite(vals)] = -1
    return ids, vals


def _run_faiss(
    q_emb, g_emb, q_lab, g_lab, positives, excluders, excl_counts, blocks, distance, depth, state,
    backend, hnsw_m, hnsw_ef_construction, hnsw_ef_search,
) -> str:
    """Top-`depth` search per query; `excl_counts[i]`: excluded pairs of query i (searched deeper by that many)."""
    try:
        import faiss  # optional dependency: only needed for these backends
    except ImportError as e:
        raise ImportError(
            f"backend={backend!r} needs faiss (pip install faiss-cpu); use backend='exact' without it"
        ) from e

    n_g, dim = g_emb.shape
    if distance == "cosine":
        q_np = _unit_rows(q_emb, "query_embeddings").numpy()
        g_np = _unit_rows(g_emb, "gallery_embeddings").numpy()
        metric = faiss.METRIC_INNER_PRODUCT
    else:
        q_np, g_np = q_emb.numpy(), g_emb.numpy()
        metric = faiss.METRIC_L2
    if backend == "faiss-flat":
        index = faiss.IndexFlatIP(dim) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
        name = "faiss-flat"
    else:
        index = faiss.IndexHNSWFlat(dim, int(hnsw_m), metric)
        index.hnsw.efConstruction = int(hnsw_ef_construction)
        name = (
            f"faiss-hnsw (approximate: M={hnsw_m}, efConstruction={hnsw_ef_construction}, efSearch>={hnsw_ef_search}; "
            "top-k lists may miss true neighbours, mAP/mINP not computed)"
        )
    index.add(np.ascontiguousarray(g_np))

    for lo, hi in blocks:
        n_rows = hi - lo
        excluded_parts = [_block_pairs(e, lo, hi, n_g) for e in excluders]
        excluded = np.unique(np.concatenate(excluded_parts)) if excluded_parts else np.zeros(0, np.int64)
        search = int(min(n_g, depth + int(excl_counts[lo:hi].max(initial=0))))
        if backend == "faiss-hnsw":
            index.hnsw.efSearch = max(int(hnsw_ef_search), search)
        raw_d, raw_i = index.search(np.ascontiguousarray(q_np[lo:hi]), search)
        raw_i = raw_i.astype(np.int64)
        keep = raw_i >= 0
        codes = np.arange(n_rows, dtype=np.int64)[:, None] * n_g + np.maximum(raw_i, 0)
        keep &= ~np.isin(codes, excluded)
        order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # kept items first, faiss order preserved
        ids = np.take_along_axis(raw_i, order, 1)
        kept = np.take_along_axis(keep, order, 1)
        raw = np.take_along_axis(raw_d, order, 1)
        dists = (1.0 - raw) if metric == faiss.METRIC_INNER_PRODUCT else np.sqrt(np.maximum(raw, 0.0))
        ids = np.where(kept, ids, -1)
        dists = np.where(kept, dists, np.inf).astype(np.float32)
        if ids.shape[1] < depth:  # gallery smaller than the depth
            pad = depth - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)

        pos_codes = _block_pairs(positives, lo, hi, n_g)
        pos_codes = pos_codes[~np.isin(pos_codes, excluded)]
        state.n_true[lo:hi] = np.bincount(pos_codes // n_g, minlength=n_rows)
        is_true = (ids >= 0) & (g_lab[np.maximum(ids, 0)] == q_lab[lo:hi, None])
        rows, cols = np.nonzero(is_true)
        k = np.cumsum(is_true, axis=1)[rows, cols] - 1
        state.add_ranks(lo, hi, rows, k, cols + 1, complete=False)
        state.add_topk(lo, hi, ids, dists, q_lab, g_lab)
    return name


__all__ = ["BACKENDS", "DISTANCES", "RetrievalReport", "evaluate_retrieval"]
