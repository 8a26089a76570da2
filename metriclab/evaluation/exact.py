"""The exact backend: every block of queries is ranked against the whole gallery, so it gives every metric.

A block's ranking keys come from one matrix product into a reused buffer; excluded pairs get the key inf; the
kept top-k comes from `torch.topk`; then each row is sorted in place and the rank of every true match is a binary
search in its sorted row (`metriclab.evaluation.ranking`).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from metriclab.evaluation.blocks import PairIndex, Pairs
from metriclab.evaluation.inputs import CheckedInputs, squared_norms, unit_rows
from metriclab.evaluation.ranking import order_topk, pessimistic_ranks
from metriclab.evaluation.report import QueryState
from metriclab.evaluation.spec import RetrievalSpec


class RankingKeys:
    """Keys that rank the gallery like the distance does, from one matrix product per block.

    Euclidean: ``|g|^2 - 2 q.g`` (the row constant ``|q|^2`` cannot change a ranking; `distances` adds it back).
    Cosine: ``-q.g`` of unit-normalised copies (ascending key = ascending 1 - cos).
    """

    def __init__(self, inputs: CheckedInputs, distance: str):
        self.distance = distance
        if distance == "cosine":
            self.q_side = -unit_rows(inputs.q_emb, "query_embeddings")
            g_side = unit_rows(inputs.g_emb, "gallery_embeddings")
            self.bias = None
        else:
            self.q_side, g_side = inputs.q_emb, inputs.g_emb
            self.bias = squared_norms(inputs.g_emb)[None, :]
            self.q_sqnorm = squared_norms(inputs.q_emb).numpy()
        self.g_side_t = g_side.T

    def block(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Keys of queries lo..hi-1 against the whole gallery, written into `out` [hi - lo, G]."""
        if self.bias is None:
            torch.mm(self.q_side[lo:hi], self.g_side_t, out=out)
        else:
            torch.addmm(self.bias, self.q_side[lo:hi], self.g_side_t, beta=1, alpha=-2, out=out)
        return out

    def distances(self, lo: int, hi: int, ids: np.ndarray, keys: np.ndarray) -> np.ndarray:
        """The distances of keys of queries lo..hi-1 (float32; inf where `ids` is -1)."""
        if self.distance == "cosine":
            dists = 1.0 + keys
        else:
            dists = np.sqrt(np.maximum(keys + self.q_sqnorm[lo:hi, None], 0.0))
        return np.where(ids >= 0, dists, np.inf).astype(np.float32)


def exact_topk(key_t: torch.Tensor, depth: int, q_lab: np.ndarray, g_lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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
    vals, ids = order_topk(vals, ids, is_true)
    key = key_t.numpy()
    for r in np.flatnonzero(cut_tie):
        # the tie group at the cut is larger than the list: collect all of it, then apply the rule
        cand = np.flatnonzero(key[r] <= vals[r, depth - 1])
        cand_true = g_lab[cand] == q_lab[r]
        order = np.lexsort((cand, cand_true, key[r, cand]))[:depth]
        vals[r], ids[r] = key[r, cand[order]], cand[order]
    ids[~np.isfinite(vals)] = -1
    return ids, vals


def _true_match_keys(positives: PairIndex, flat_key: np.ndarray, lo: int, hi: int,
                     n_g: int) -> tuple[np.ndarray, np.ndarray]:
    """(row within block, key) of the block's true matches: same-label pairs not excluded (key inf)."""
    pos_rows, pos_cols = positives.pairs(lo, hi)
    pos_keys = flat_key[pos_rows * n_g + pos_cols]
    not_excluded = np.isfinite(pos_keys)
    return pos_rows[not_excluded], pos_keys[not_excluded]


def _sort_rows(key: np.ndarray, pool: ThreadPoolExecutor, n_threads: int) -> None:
    """Sort each row of `key` in place (numpy's SIMD sort), the rows split across the pool's threads."""
    n_rows = key.shape[0]
    bounds = np.linspace(0, n_rows, min(n_threads, n_rows) + 1).astype(int)
    list(pool.map(lambda ab: key[ab[0] : ab[1]].sort(axis=1), zip(bounds[:-1], bounds[1:])))


def run_exact(inputs: CheckedInputs, pairs: Pairs, blocks: list[tuple[int, int]], spec: RetrievalSpec,
              state: QueryState) -> str:
    """Fill `state` block by block; returns the backend's name for the report."""
    n_g = inputs.n_g
    keys = RankingKeys(inputs, spec.distance)
    buffer = torch.empty(max(hi - lo for lo, hi in blocks), n_g, dtype=torch.float32)
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
            pos_rows, pos_keys = _true_match_keys(pairs.positives, flat_key, lo, hi, n_g)
            state.n_true[lo:hi] = np.bincount(pos_rows, minlength=n_rows)

            if depth > 0:
                ids, top_keys = exact_topk(key_t, depth, inputs.q_lab[lo:hi], inputs.g_lab)
                state.add_topk(lo, hi, ids, keys.distances(lo, hi, ids, top_keys), inputs.q_lab, inputs.g_lab)

            _sort_rows(key, pool, n_threads)
            rows, k, rank = pessimistic_ranks(pos_rows, pos_keys, key)
            state.add_ranks(lo, hi, rows, k, rank, complete=True)
    return "exact"


__all__ = ["RankingKeys", "exact_topk", "run_exact"]
