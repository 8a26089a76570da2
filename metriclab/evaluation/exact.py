"""The exact backend: every block of queries is ranked against the whole gallery, so it gives every metric.

A block's ranking keys come from one float32 matrix product into a reused buffer; excluded pairs get the key inf.
Each row's (key, gallery index) pairs are then sorted (`SortedBlock`): the top-k list is the first items of a row,
and the rank of every true match is a binary search in its sorted row (`metriclab.evaluation.ranking`).

Near-ties: a float32 key is off from the exact one by at most a known bound (`RankingKeys.tol`), so two items whose
keys differ by more than twice that are ordered right; the rest are compared by distances recomputed in float64
from the embeddings. For the ranks that means the rows where a wrong item's key lies within the bound of a true
match's key; for the top-k list, the items whose keys lie within the bound of the k-th key. The float32 keys are
small because the embeddings are centred first where their mean is a real part of their norms (one mean for both
sides: distances do not change), which keeps the bound, and so the number of rows re-ranked, small. Exactly equal
distances stay ties, ranked pessimistically.

Threads: the matrix product is torch's (its own threads); from the keys on, a block's rows are split across a pool
of threads, each packing, sorting and ranking its rows with numpy (which releases the GIL for that work).
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

import numpy as np
import torch

from metriclab.evaluation.blocks import PairIndex, Pairs
from metriclab.evaluation.inputs import CheckedInputs, joint_mean, squared_norms, unit_rows
from metriclab.evaluation.ranking import (
    count_le_by_row,
    count_le_in_segments,
    pessimistic_ranks,
    window_bounds,
)
from metriclab.evaluation.report import QueryState
from metriclab.evaluation.spec import RetrievalSpec

# float32 unit roundoff
U32 = 2.0**-24
# embeddings are centred when |mean|^2 exceeds this fraction of the mean |g|^2 (|mean| above ~3 % of a typical norm)
CENTRE_FROM = 1e-3
# (query, gallery) pairs per float64 chunk when distances are recomputed exactly
PAIR_CHUNK = 1024
# rows per pass when a block's keys are packed with their gallery indices: the int32 temporaries stay in cache (the
# same work on 64-row strided passes took 2.3x as long)
PACK_ROWS = 8
# which int32 half of a packed int64 holds the key order (high) and the gallery index (low)
HIGH, LOW = (1, 0) if sys.byteorder == "little" else (0, 1)
FLOAT32_MAX = np.finfo(np.float32).max


def numpy_backed(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor whose memory numpy allocated. Why: numpy asks the kernel for huge pages for
    large arrays (madvise), torch's allocator does not; on this kind of virtual machine the first touch of a 64 MB
    torch buffer took 65-120 ms of page faults, numpy's 4-17 ms, and the engine allocates its buffers per call."""
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


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
            self.q_side, g_side = inputs.q_emb, inputs.g_emb
            bias = squared_norms(g_side)
            # Centring shrinks the norms in the bound below (and so the rows re-ranked in float64) when the mean is a
            # real part of them; for embeddings centred already it would be two copies for a bound ~0.1 % smaller.
            if float(mean @ mean) > CENTRE_FROM * float(bias.mean()):
                self.q_side = torch.sub(inputs.q_emb, mean, out=numpy_backed(inputs.q_emb.shape))
                g_side = torch.sub(inputs.g_emb, mean, out=numpy_backed(inputs.g_emb.shape))
                bias = squared_norms(g_side)
            self.bias = bias[None, :]
            q_norms = torch.linalg.vector_norm(self.q_side, dim=1).double().numpy()
            g_max = float(bias.max().sqrt())
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
        # numpy, single-threaded: this runs in the engine's worker threads (torch's own threads would oversubscribe)
        q_emb, g_emb = self.q_exact.numpy(), self.g_exact.numpy()
        for a in range(0, len(q_rows), PAIR_CHUNK):
            q = q_emb[q_rows[a : a + PAIR_CHUNK]].astype(np.float64)
            g = g_emb[g_cols[a : a + PAIR_CHUNK]]  # float32: promoted inside the operations
            if self.distance == "cosine":
                g = g.astype(np.float64)
                norms = np.sqrt(np.einsum("ij,ij->i", q, q)) * np.sqrt(np.einsum("ij,ij->i", g, g))
                value = 1.0 - np.einsum("ij,ij->i", q, g) / norms
            else:
                q -= g
                value = np.einsum("ij,ij->i", q, q)
            out[a : a + len(q)] = value
        return out

    def reported(self, exact: np.ndarray) -> np.ndarray:
        """The distances to report (float32) from `exact` values."""
        return (exact if self.distance == "cosine" else np.sqrt(np.maximum(exact, 0.0))).astype(np.float32)


class SortedBlock:
    """Each row of a block's keys sorted together with its gallery indices: one int64 per item, the key's order
    (`order_keys`) in the high 32 bits and the gallery index in the low 32 bits. Sorting those int64s (numpy's SIMD
    sort) orders every row by (key, gallery index), so the items whose keys lie in a range are one contiguous run of
    a sorted row, with their gallery indices at hand: the top-k list is a row's first items, and the members of a
    near-tie window are a slice. Why packed: sorting the float32 keys alone was cheaper, but finding a window's
    members then took a pass over the whole unsorted row; on random Market-size embeddings (nearly every row has a
    near-tie) that pass plus `torch.topk` cost more than the wider sort (docs/benchmarks.md)."""

    def __init__(self, key: np.ndarray, buffer: np.ndarray):
        n_rows, n_g = key.shape
        self.n_g = n_g
        self.packed = buffer[:n_rows]
        words = self.packed.view(np.int32).reshape(n_rows, n_g, 2)
        sign, order = np.empty((2, PACK_ROWS, n_g), dtype=np.int32)  # small enough to stay in cache
        for r in range(0, n_rows, PACK_ROWS):
            e = min(n_rows, r + PACK_ROWS)
            order_keys(key[r:e], out=order[: e - r], sign=sign[: e - r])
            words[r:e, :, HIGH] = order[: e - r]
            words[r:e, :, LOW] = np.arange(n_g, dtype=np.int32)
        self.packed.sort(axis=1)

    def count_le(self, rows: np.ndarray, values: np.ndarray) -> np.ndarray:
        """For each (row, float32 value): how many items of the row have a key <= value."""
        limit = (order_keys(np.ascontiguousarray(values, dtype=np.float32)).astype(np.int64) << 32) | 0xFFFFFFFF
        lengths = np.full(len(rows), self.n_g, dtype=np.int64)
        return count_le_in_segments(self.packed.reshape(-1), rows * self.n_g, lengths, limit)

    def cols(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Gallery indices of the items at `positions` of the sorted `rows`."""
        return self.packed[rows, positions] & 0xFFFFFFFF

    def runs(self, rows: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, gallery index) of the items at sorted positions starts[i]..ends[i]-1 of rows[i]."""
        lengths = np.maximum(ends - starts, 0)
        total = int(lengths.sum())
        out_rows = np.repeat(rows, lengths)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return out_rows, self.cols(out_rows, np.repeat(starts, lengths) + within)


def order_keys(values: np.ndarray, out: np.ndarray | None = None, sign: np.ndarray | None = None) -> np.ndarray:
    """int32 with the order of the float32 `values` (not NaN): the bit pattern for >= +0.0, its negated magnitude
    below, so -0.0 and +0.0 are equal as floats are. `out`, `sign`: int32 buffers of the values' shape."""
    bits = values.view(np.int32)
    sign = np.right_shift(bits, 31, out=sign)  # -1 where negative
    out = np.bitwise_and(bits, 0x7FFFFFFF, out=out)
    out ^= sign
    out -= sign  # two's complement negation where negative
    return out


def exact_topk(block: SortedBlock, key: np.ndarray, depth: int, q_lab: np.ndarray, g_lab: np.ndarray,
               keys: RankingKeys, lo: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`depth` gallery ids per row (-1 = none) under the pessimistic tie rule and their exact distances (inf =
    none): every item whose key is within `tol` of the depth-th key is a candidate, ordered by exact distance. The
    candidates are the first items of each sorted row."""
    n_rows = key.shape[0]
    every = np.arange(n_rows, dtype=np.int64)
    kth = key[every, block.cols(every, np.full(n_rows, depth - 1))]
    _, limit = window_bounds(kth, keys.tol[lo : lo + n_rows])
    n_cand = block.count_le(every, np.minimum(limit, FLOAT32_MAX))  # excluded items (key inf) never
    rows, cols = block.runs(every, np.zeros(n_rows, dtype=np.int64), n_cand)
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


def exact_ranks(near: np.ndarray, pos: tuple[np.ndarray, ...], block: SortedBlock, key: np.ndarray,
                keys: RankingKeys, lo: int, q_lab: np.ndarray,
                g_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks (rows, k, rank as `pessimistic_ranks` gives them) of the true matches of rows `near`, exact: a wrong
    item precedes a true match when its key is below the match's window, or it lies in the window and its exact
    distance is <= the match's. pos: the block's true matches (rows, gallery index, key, window low and high, and
    the window's first and end positions in the sorted row), grouped by row, keys ascending; key: the block's
    keys."""
    n_rows = key.shape[0]
    sel = np.isin(pos[0], near)
    t_rows, t_cols, t_keys, t_lo, t_hi, t_start, t_end = (a[sel] for a in pos)
    # the windows of a row ascend, so their union is the runs from max(start, previous end) to end
    prev_end = np.concatenate([[0], t_end[:-1]])
    same_row = np.concatenate([[False], t_rows[1:] == t_rows[:-1]])
    c_rows, c_cols = block.runs(t_rows, np.where(same_row, np.maximum(t_start, prev_end), t_start), t_end)
    wrong = g_lab[c_cols] != q_lab[c_rows]
    c_rows, c_cols = c_rows[wrong], c_cols[wrong]
    t_dist, c_dist = keys.exact(lo + t_rows, t_cols), keys.exact(lo + c_rows, c_cols)
    # wrong items below the window (all items there, less true matches and less window members of other
    # windows), plus the window members (of any window of the row) no farther than the true match
    below = (t_start - count_le_by_row(t_rows, t_keys, t_rows, t_lo, n_rows)
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


def _block_ranks(pos: tuple[np.ndarray, np.ndarray, np.ndarray], block: SortedBlock, key: np.ndarray,
                 keys: RankingKeys, lo: int,
                 labels: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ranks of the block's true matches: from the float32 keys, and exactly in the rows with near-ties (a wrong
    item's key within `tol` of a true match's key: float32 cannot say which of the two is nearer)."""
    t_rows, _, t_keys = pos
    n_rows = key.shape[0]
    rows, k, rank = pessimistic_ranks(t_rows, t_keys, block.count_le, n_rows)
    t_lo, t_hi = window_bounds(t_keys, keys.tol[lo + t_rows])
    t_hi = np.minimum(t_hi, FLOAT32_MAX)  # a window never takes in excluded items (key inf)
    t_start, t_end = block.count_le(t_rows, t_lo), block.count_le(t_rows, t_hi)
    true_in = (count_le_by_row(t_rows, t_keys, t_rows, t_hi, n_rows)
               - count_le_by_row(t_rows, t_keys, t_rows, t_lo, n_rows))
    near = np.unique(t_rows[t_end - t_start > true_in])
    if len(near) == 0:
        return rows, k, rank
    fixed = exact_ranks(near, (*pos, t_lo, t_hi, t_start, t_end), block, key, keys, lo, *labels)
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
    buffer = numpy_backed((max_rows, n_g))
    sort_buffer = np.empty((max_rows, n_g), dtype=np.int64)  # (key order, gallery index) per item, sorted by row
    depth = min(max([spec.keep_top_k, *spec.knn_top_k, 0]), n_g)
    n_threads = max(1, torch.get_num_threads())

    def rank_rows(lo: int, key: np.ndarray, buffer: np.ndarray) -> tuple[
            np.ndarray, Optional[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Everything of queries lo..lo+len(key)-1 after their keys: a thread's share of a block."""
        n_rows = key.shape[0]
        flat_key = key.reshape(-1)
        for index in pairs.excluders:
            flat_key[index.flat_pairs(lo, lo + n_rows, n_g)] = np.inf
        pos = _true_matches(pairs.positives, flat_key, lo, lo + n_rows, n_g)
        n_true = np.bincount(pos[0], minlength=n_rows)
        q_lab = inputs.q_lab[lo : lo + n_rows]
        block = SortedBlock(key, buffer)
        topk = exact_topk(block, key, depth, q_lab, inputs.g_lab, keys, lo) if depth > 0 else None
        return n_true, topk, _block_ranks(pos, block, key, keys, lo, (q_lab, inputs.g_lab))

    # The rows of a block are split across threads from the keys on: numpy's sort and most of its array work release
    # the GIL, so the single-threaded work after the (already multi-threaded) matrix product runs on every core.
    with ThreadPoolExecutor(n_threads) as pool:
        for lo, hi in blocks:
            key = keys.block(lo, hi, buffer[: hi - lo]).numpy()
            cuts = np.linspace(0, hi - lo, min(n_threads, hi - lo) + 1).astype(int)
            parts = list(zip(cuts[:-1], cuts[1:]))
            done = pool.map(lambda ab, lo=lo, key=key: rank_rows(lo + ab[0], key[ab[0] : ab[1]],
                                                                 sort_buffer[ab[0] : ab[1]]), parts)
            for (a, b), (n_true, topk, ranks) in zip(parts, done):
                state.n_true[lo + a : lo + b] = n_true
                if topk is not None:
                    state.add_topk(lo + a, lo + b, *topk, inputs.q_lab, inputs.g_lab)
                state.add_ranks(lo + a, lo + b, *ranks, complete=True)
    return "exact"


__all__ = ["RankingKeys", "SortedBlock", "exact_ranks", "exact_topk", "order_keys", "run_exact"]
