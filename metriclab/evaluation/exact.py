"""The exact backend: every block of queries is ranked against the whole gallery, so it gives every metric.

A block's ranking keys come from one float32 matrix product into a reused buffer; excluded pairs get the key inf.
Each row is then sorted (a copy) and the rank of every true match is a binary search in its sorted row
(`metriclab.evaluation.ranking`).

Near-ties: a float32 key is off from the exact one by at most a known bound (`RankingKeys.tol`), so two items whose
keys differ by more than twice that are ordered right; the rest are compared by distances recomputed in float64
from the embeddings. For the ranks that means the rows where a wrong item's key lies within the bound of a true
match's key; for the top-k list, the items whose keys lie within the bound of the k-th key. The float32 keys are
small because the embeddings are centred first (one mean for both sides: distances do not change), which keeps the
bound, and so the number of rows re-ranked, small. Exactly equal distances stay ties, ranked pessimistically.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from metriclab.evaluation.blocks import PairIndex, Pairs
from metriclab.evaluation.inputs import CheckedInputs, joint_mean, squared_norms, unit_rows
from metriclab.evaluation.ranking import (
    count_le_by_row,
    count_le_in_segments,
    count_le_in_sorted_rows,
    near_tie_rows,
    pessimistic_ranks,
    window_bounds,
)
from metriclab.evaluation.report import QueryState
from metriclab.evaluation.spec import RetrievalSpec

# float32 unit roundoff
U32 = 2.0**-24
# (query, gallery) pairs per float64 chunk when distances are recomputed exactly
PAIR_CHUNK = 1024
# rows of a block per pass when the members of near-tie windows are collected, and the most buckets per row
WINDOW_ROWS = 64
BUCKETS = 1 << 16


class RankingKeys:
    """Keys that rank the gallery like the distance does, from one matrix product per block, and the exact
    distances they stand for.

    Euclidean: ``|g|^2 - 2 q.g`` of centred copies (the row constant ``|q|^2`` cannot change a ranking); exact:
    ``|q - g|^2`` in float64. Cosine: ``-q.g`` of unit-normalised copies; exact: ``1 - q.g / (|q||g|)`` in
    float64. `tol[i]`: twice the bound on |float32 key - exact key| of query i, so keys further apart than `tol`
    are in the exact order.
    """

    def __init__(self, inputs: CheckedInputs, distance: str):
        self.distance = distance
        if distance == "cosine":
            q_unit = unit_rows(inputs.q_emb, "query_embeddings")
            g_side = unit_rows(inputs.g_emb, "gallery_embeddings")
            self.q_side, self.bias = -q_unit, None
            q_norms, g_max = np.ones(inputs.n_q), 1.0
        else:
            mean = joint_mean(inputs.q_emb, inputs.g_emb)
            self.q_side, g_side = inputs.q_emb - mean, inputs.g_emb - mean
            self.bias = squared_norms(g_side)[None, :]
            q_norms = torch.linalg.vector_norm(self.q_side, dim=1).double().numpy()
            g_max = float(torch.linalg.vector_norm(g_side, dim=1).max())
        # Rounding errors of a length-D float32 dot product grow like sqrt(D) u |q||g| (the worst case D u needs them
        # all to push one way: it would re-rank nearly every row of a Market-size random gallery); centring, the
        # bias and the final rounding add a few u (|q| + |g|)^2. Measured: <= 2.5 u (|q| + |g|)^2 for D = 64..2048.
        # Twice the bound: two keys of exactly equal distances may each be off.
        self.tol = 2.0 * (np.sqrt(inputs.q_emb.shape[1]) + 4) * U32 * (q_norms + g_max) ** 2
        self.g_side_t = g_side.T
        self.q_exact, self.g_exact = inputs.q_emb, inputs.g_emb

    def block(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Keys of queries lo..hi-1 against the whole gallery, written into `out` [hi - lo, G]."""
        if self.bias is None:
            torch.mm(self.q_side[lo:hi], self.g_side_t, out=out)
        else:
            torch.addmm(self.bias, self.q_side[lo:hi], self.g_side_t, beta=1, alpha=-2, out=out)
        return out

    def exact(self, q_rows: np.ndarray, g_cols: np.ndarray) -> np.ndarray:
        """float64 distances (squared for euclidean) of the pairs (query q_rows[i], gallery g_cols[i])."""
        out = np.empty(len(q_rows))
        for a in range(0, len(q_rows), PAIR_CHUNK):
            q = self.q_exact[torch.from_numpy(q_rows[a : a + PAIR_CHUNK])].double()
            g = self.g_exact[torch.from_numpy(g_cols[a : a + PAIR_CHUNK])].double()
            if self.distance == "cosine":
                norms = torch.linalg.vector_norm(q, dim=1) * torch.linalg.vector_norm(g, dim=1)
                value = 1.0 - (q * g).sum(1) / norms
            else:
                value = ((q - g) ** 2).sum(1)
            out[a : a + len(q)] = value.numpy()
        return out

    def reported(self, exact: np.ndarray) -> np.ndarray:
        """The distances to report (float32) from `exact` values."""
        return (exact if self.distance == "cosine" else np.sqrt(np.maximum(exact, 0.0))).astype(np.float32)


def exact_topk(key_t: torch.Tensor, depth: int, q_lab: np.ndarray, g_lab: np.ndarray, keys: RankingKeys,
               lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` gallery ids per row (-1 = none) under the pessimistic tie rule and their exact distances (inf =
    none): every item whose key is within `tol` of the depth-th key is a candidate, ordered by exact distance."""
    n_rows, n_g = key_t.shape
    search = min(2 * depth + 8, n_g)
    vals_t, ids_t = torch.topk(key_t, search, dim=1, largest=False, sorted=True)
    vals, ids = vals_t.numpy(), ids_t.numpy().astype(np.int64)
    limit = vals[:, depth - 1].astype(np.float64) + keys.tol[lo : lo + n_rows]
    take = (vals <= limit[:, None]) & np.isfinite(vals)
    deeper = take[:, -1] & (search < n_g)  # candidates may go on past the list: take them from the whole row
    take[deeper] = False
    rows, pos = np.nonzero(take)
    parts_r, parts_c = [rows], [ids[rows, pos]]
    key = key_t.numpy()
    for r in np.flatnonzero(deeper):
        extra = np.flatnonzero((key[r] <= limit[r]) & np.isfinite(key[r]))
        parts_r.append(np.full(len(extra), r, dtype=np.int64))
        parts_c.append(extra)
    rows, cols = np.concatenate(parts_r).astype(np.int64), np.concatenate(parts_c).astype(np.int64)
    dist = keys.exact(lo + rows, cols)
    order = np.lexsort((cols, g_lab[cols] == q_lab[rows], dist, rows))
    rows, cols, dist = rows[order], cols[order], dist[order]
    place = np.arange(len(rows)) - np.searchsorted(rows, rows)
    keep = place < depth
    out_ids = np.full((n_rows, depth), -1, dtype=np.int64)
    out_dist = np.full((n_rows, depth), np.inf, dtype=np.float32)
    out_ids[rows[keep], place[keep]] = cols[keep]
    out_dist[rows[keep], place[keep]] = keys.reported(dist[keep])
    return out_ids, out_dist


def _window_members(near: np.ndarray, t_rows: np.ndarray, t_lo: np.ndarray, t_hi: np.ndarray,
                    key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, gallery index) of the items of rows `near` (sorted) whose key lies in a window (t_lo, t_hi] of a true
    match of their row (t_rows grouped by row, windows ascending within a row).

    Each row is cut into buckets at least as wide as its windows, the buckets a window touches (at most two) are
    marked, and only the items in marked buckets are checked against the windows: a few passes over the row
    instead of a search per item."""
    local = np.searchsorted(near, t_rows)
    lo64, hi64 = t_lo.astype(np.float64), t_hi.astype(np.float64)
    base = np.full(len(near), np.inf)
    top, width = np.full(len(near), -np.inf), np.zeros(len(near))
    np.minimum.at(base, local, lo64)
    np.maximum.at(top, local, hi64)
    np.maximum.at(width, local, hi64 - lo64)
    width = np.maximum(width, (top - base) / BUCKETS)
    width = np.maximum(width, 1e-30)  # windows around 0 can be a few denormals wide: keep 1 / width finite
    n_buckets = int(np.minimum(np.floor((top - base) / width), BUCKETS).max()) + 3
    edges = [np.floor((e - base[local]) / width[local]).astype(np.int64) for e in (lo64, hi64)]
    found_r, found_c = [], []
    for a in range(0, len(near), WINDOW_ROWS):
        rows = slice(a, a + WINDOW_ROWS)
        mine = (local >= a) & (local < a + WINDOW_ROWS)
        marked = np.zeros((min(WINDOW_ROWS, len(near) - a), n_buckets), dtype=bool)
        for at, step in ((at, step) for at in edges for step in (-1, 0, 1)):
            # neighbours too: the items' buckets below are computed in float32
            marked[local[mine] - a, np.clip(at[mine] + step, 0, n_buckets - 1)] = True
        k = torch.from_numpy(key[near[rows]])
        scale = torch.from_numpy((1.0 / width[rows, None]).astype(np.float32))
        bucket = ((k - torch.from_numpy(base[rows, None].astype(np.float32))) * scale).floor_()
        bucket = bucket.clamp_(-1, n_buckets - 1).long()
        hit = torch.from_numpy(marked).gather(1, bucket.clamp(min=0)) & (bucket >= 0)
        r, c = np.nonzero(hit.numpy())
        found_r.append(a + r)
        found_c.append(c)
    r, c = np.concatenate(found_r).astype(np.int64), np.concatenate(found_c).astype(np.int64)
    # exact check: the first window of the row whose top is >= the key must start below it
    counts = np.bincount(local, minlength=len(near))
    starts = np.cumsum(counts) - counts
    k = key[near[r], c]
    first = count_le_in_segments(t_hi, starts[r], counts[r], np.nextafter(k, np.float32(-np.inf)))
    inside = first < counts[r]
    inside[inside] = t_lo[starts[r][inside] + first[inside]] < k[inside]
    return near[r[inside]], c[inside]


def exact_ranks(near: np.ndarray, pos: tuple[np.ndarray, np.ndarray, np.ndarray], key: np.ndarray,
                sorted_key: np.ndarray, keys: RankingKeys, lo: int, q_lab: np.ndarray,
                g_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks (rows, k, rank as `pessimistic_ranks` gives them) of the true matches of rows `near`, exact: a wrong
    item precedes a true match when its key is below the match's window, or it lies in the window and its exact
    distance is <= the match's. pos: the block's true matches (rows, gallery index, key) grouped by row, keys
    ascending; key: the unsorted keys, sorted_key: each row sorted."""
    n_rows = key.shape[0]
    sel = np.isin(pos[0], near)
    t_rows, t_cols, t_keys = pos[0][sel], pos[1][sel], pos[2][sel]
    t_lo, t_hi = window_bounds(t_keys, keys.tol[lo + t_rows])
    c_rows, c_cols = _window_members(near, t_rows, t_lo, t_hi, key)
    wrong = g_lab[c_cols] != q_lab[c_rows]
    c_rows, c_cols = c_rows[wrong], c_cols[wrong]
    t_dist, c_dist = keys.exact(lo + t_rows, t_cols), keys.exact(lo + c_rows, c_cols)
    # wrong items below the window (all items there, less true matches and less window members of other
    # windows), plus the window members (of any window of the row) no farther than the true match
    below = (count_le_in_sorted_rows(sorted_key, t_rows, t_lo) - count_le_by_row(t_rows, t_keys, t_rows, t_lo, n_rows)
             - count_le_by_row(c_rows, key[c_rows, c_cols], t_rows, t_lo, n_rows))
    wrong_le = below + count_le_by_row(c_rows, c_dist, t_rows, t_dist, n_rows)
    order = np.lexsort((t_dist, t_rows))
    rows, wrong_le = t_rows[order], wrong_le[order]
    k = np.arange(len(rows)) - np.searchsorted(rows, rows)
    return rows, k, k + 1 + wrong_le


def _true_matches(positives: PairIndex, flat_key: np.ndarray, lo: int, hi: int,
                  n_g: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row within block, gallery index, key) of the block's true matches (same-label pairs not excluded: key inf),
    grouped by row, keys ascending."""
    pos_rows, pos_cols = positives.pairs(lo, hi)
    pos_keys = flat_key[pos_rows * n_g + pos_cols]
    kept = np.isfinite(pos_keys)
    pos_rows, pos_cols, pos_keys = pos_rows[kept], pos_cols[kept], pos_keys[kept]
    order = np.lexsort((pos_keys, pos_rows))
    return pos_rows[order], pos_cols[order], pos_keys[order]


def _sort_rows(key: np.ndarray, pool: ThreadPoolExecutor, n_threads: int) -> None:
    """Sort each row of `key` in place (numpy's SIMD sort), the rows split across the pool's threads."""
    n_rows = key.shape[0]
    bounds = np.linspace(0, n_rows, min(n_threads, n_rows) + 1).astype(int)
    list(pool.map(lambda ab: key[ab[0] : ab[1]].sort(axis=1), zip(bounds[:-1], bounds[1:])))


def _block_ranks(pos: tuple[np.ndarray, np.ndarray, np.ndarray], key: np.ndarray, sorted_key: np.ndarray,
                 keys: RankingKeys, lo: int,
                 labels: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the block's true matches: from the float32 keys, and exactly in the rows with near-ties."""
    rows, k, rank = pessimistic_ranks(pos[0], pos[2], sorted_key)
    near = np.flatnonzero(near_tie_rows(pos[0], pos[2], keys.tol[lo + pos[0]], sorted_key))
    if len(near) == 0:
        return rows, k, rank
    fixed = exact_ranks(near, pos, key, sorted_key, keys, lo, *labels)
    kept = ~np.isin(rows, near)
    merged = [np.concatenate([a[kept], b]) for a, b in zip((rows, k, rank), fixed)]
    order = np.lexsort((merged[1], merged[0]))
    return merged[0][order], merged[1][order], merged[2][order]


def run_exact(inputs: CheckedInputs, pairs: Pairs, blocks: list[tuple[int, int]], spec: RetrievalSpec,
              state: QueryState, keys: Any = None) -> str:
    """Fill `state` block by block; returns the backend's name for the report. `keys`: what ranks the gallery
    (default: `RankingKeys` of the inputs' distance; a re-ranker's keys have the same interface)."""
    n_g = inputs.n_g
    keys = RankingKeys(inputs, spec.distance) if keys is None else keys
    max_rows = max(hi - lo for lo, hi in blocks)
    buffer = torch.empty(max_rows, n_g, dtype=torch.float32)
    sort_buffer = np.empty((max_rows, n_g), dtype=np.float32)  # sorted copy: near-tie rows need the unsorted keys
    depth = min(max([spec.keep_top_k, *spec.knn_top_k, 0]), n_g)
    n_threads = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(n_threads) as pool:
        for lo, hi in blocks:
            n_rows = hi - lo
            key_t = keys.block(lo, hi, buffer[:n_rows])
            key = key_t.numpy()
            flat_key = key.reshape(-1)
            for index in pairs.excluders:
                flat_key[index.flat_pairs(lo, hi, n_g)] = np.inf
            pos = _true_matches(pairs.positives, flat_key, lo, hi, n_g)
            state.n_true[lo:hi] = np.bincount(pos[0], minlength=n_rows)
            q_lab = inputs.q_lab[lo:hi]

            if depth > 0:
                ids, dists = exact_topk(key_t, depth, q_lab, inputs.g_lab, keys, lo)
                state.add_topk(lo, hi, ids, dists, inputs.q_lab, inputs.g_lab)

            sorted_key = sort_buffer[:n_rows]
            np.copyto(sorted_key, key)
            _sort_rows(sorted_key, pool, n_threads)
            state.add_ranks(lo, hi, *_block_ranks(pos, key, sorted_key, keys, lo, (q_lab, inputs.g_lab)),
                            complete=True)
    return "exact"


__all__ = ["RankingKeys", "exact_ranks", "exact_topk", "run_exact"]
