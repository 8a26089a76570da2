"""Ranks under the pessimistic tie rule and kNN votes, vectorised over a block of queries.

The rule (the engine's docstring): within a group of equal distances the wrong items come before the true matches,
and among items of the same kind the lower gallery index comes first.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np


def count_le_in_segments(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray,
                         values: np.ndarray) -> np.ndarray:
    """For each i: how many entries of the ascending segment flat[starts[i] : starts[i] + lengths[i]] are <=
    values[i] (a vectorised binary search)."""
    lo = np.zeros(len(values), dtype=np.int64)
    hi = np.asarray(lengths, dtype=np.int64).copy()
    if flat.size == 0 or len(values) == 0:
        return lo
    last = np.maximum(hi - 1, 0)
    for _ in range(int(math.ceil(math.log2(int(hi.max(initial=0)) + 1))) + 1):
        active = lo < hi
        if not active.any():
            break
        mid = (lo + hi) >> 1
        go_right = flat[starts + np.minimum(mid, last)] <= values
        lo = np.where(active & go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
    return lo


def count_le_by_row(item_rows: np.ndarray, item_values: np.ndarray, rows: np.ndarray, values: np.ndarray,
                    n_rows: int) -> np.ndarray:
    """For each (row, value): how many of the items (item_rows, item_values) in that row have a value <= it."""
    order = np.lexsort((item_values, item_rows))
    counts = np.bincount(item_rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    return count_le_in_segments(item_values[order], starts[rows], counts[rows], values)


def window_bounds(values: np.ndarray, tol: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 (lo, hi) with lo <= values - tol and hi >= values + tol (rounded outwards: a wider window is safe)."""
    wide = np.float32(np.inf)
    lo = np.nextafter((values.astype(np.float64) - tol).astype(np.float32), -wide)
    hi = np.nextafter((values.astype(np.float64) + tol).astype(np.float32), wide)
    return lo, hi


def pessimistic_ranks(
    rows: np.ndarray, values: np.ndarray, count_le: Callable[[np.ndarray, np.ndarray], np.ndarray], n_rows: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the true matches (rows, their distance keys) of a block of `n_rows` rows; `count_le(rows, values)`:
    how many non-excluded items of each row have a key <= the value.

    Returns rows, k (0-based position among the row's true matches) and rank (1-based), grouped by row, k ascending.
    rank_k = (k + 1) + #wrong items with key <= key_k (wrong items first in ties).
    """
    order = np.lexsort((values, rows))
    rows, values = rows[order], values[order]
    n = len(rows)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    row_counts = np.bincount(rows, minlength=n_rows)
    row_first = np.cumsum(row_counts) - row_counts
    k = np.arange(n, dtype=np.int64) - row_first[rows]
    # true matches with key <= own key (the whole tie group of true matches counts)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (rows[1:] != rows[:-1]) | (values[1:] != values[:-1])
    group_id = np.cumsum(new_group) - 1
    group_end = np.append(np.flatnonzero(new_group)[1:], n)
    true_le = group_end[group_id] - row_first[rows]
    all_le = count_le(rows, values)
    rank = all_le - true_le + k + 1
    return rows, k, rank


def order_topk(vals: np.ndarray, ids: np.ndarray, is_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder each row by (distance, wrong-before-true, gallery index): the pessimistic rule within ties."""
    n_rows, k = vals.shape
    row_ids = np.repeat(np.arange(n_rows), k)
    order = np.lexsort((ids.ravel(), is_true.ravel(), vals.ravel(), row_ids)).reshape(n_rows, k)
    order -= (np.arange(n_rows) * k)[:, None]
    return np.take_along_axis(vals, order, 1), np.take_along_axis(ids, order, 1)


def knn_correct(top_labels: np.ndarray, top_valid: np.ndarray, query_labels: np.ndarray, k: int) -> np.ndarray:
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


__all__ = ["count_le_by_row", "count_le_in_segments", "knn_correct", "order_topk", "pessimistic_ranks",
           "window_bounds"]
