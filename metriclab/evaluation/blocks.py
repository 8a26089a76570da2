"""(query, gallery) pairs that share a key, built sparsely per block of queries, and the plan of those blocks.

True matches share a label; excluded pairs share an id (the same dataset row) or a sequence. None of these is ever
a Q×G mask: gallery items are grouped by code once, and a block's pairs are read out of the groups.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from metriclab.evaluation.inputs import CheckedInputs

# Default block: the distances of one block of queries stay within this many bytes (float32). The exact backend
# keeps twice as much again beside them (each item's key packed with its gallery index, 8 bytes): 96 MB per block.
BLOCK_BYTES = 32 * 2**20
# A block is also cut so that its (query, gallery) true-match / exclusion pairs stay bounded (few labels, big
# galleries).
PAIR_BUDGET = 2_000_000


def joint_codes(q_values: np.ndarray, g_values: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Factorize query and gallery values together; missing values (None/NaN) get -1 (= match nothing)."""
    values = np.concatenate([np.asarray(q_values, dtype=object), np.asarray(g_values, dtype=object)])
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    codes = codes.astype(np.int64)
    return codes[: len(q_values)], codes[len(q_values) :], len(uniques)


class PairIndex:
    """Gallery items grouped by a code, so the pairs of a query block that share a code are built sparsely."""

    def __init__(self, query_codes: np.ndarray, gallery_codes: np.ndarray, n_codes: int):
        self.order = np.argsort(gallery_codes, kind="stable")
        n_missing = int((gallery_codes < 0).sum())
        counts = np.bincount(gallery_codes[gallery_codes >= 0], minlength=max(n_codes, 1))
        starts = n_missing + np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        has = query_codes >= 0
        self.query_counts = np.where(has, counts[np.where(has, query_codes, 0)], 0).astype(np.int64)
        self.query_starts = np.where(has, starts[np.where(has, query_codes, 0)], 0).astype(np.int64)

    @classmethod
    def of_values(cls, q_values: np.ndarray, g_values: np.ndarray) -> "PairIndex":
        """Pairs whose query and gallery values are equal (missing values pair with nothing)."""
        return cls(*joint_codes(q_values, g_values))

    def pairs(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(row within block, gallery index) of every pair of queries lo..hi-1, grouped by row."""
        counts = self.query_counts[lo:hi]
        total = int(counts.sum())
        rows = np.repeat(np.arange(hi - lo, dtype=np.int64), counts)
        row_first = np.cumsum(counts) - counts
        within = np.arange(total, dtype=np.int64) - np.repeat(row_first, counts)
        cols = self.order[np.repeat(self.query_starts[lo:hi], counts) + within]
        return rows, cols

    def flat_pairs(self, lo: int, hi: int, n_g: int) -> np.ndarray:
        """The pairs of queries lo..hi-1 as flat indices ``row * n_g + gallery index`` into the block's distances."""
        rows, cols = self.pairs(lo, hi)
        return rows * n_g + cols


@dataclass
class Pairs:
    """The pairs the engine treats apart: true-match candidates (same label) and excluded pairs (same id, same
    sequence); `excluded_counts[i]`: how many excluded pairs query i has (an upper bound: the kinds may overlap)."""

    positives: PairIndex
    excluders: list[PairIndex]
    excluded_counts: np.ndarray

    @classmethod
    def of(cls, inputs: CheckedInputs) -> "Pairs":
        excluders = [
            PairIndex.of_values(q, g)
            for q, g in ((inputs.q_ids, inputs.g_ids), (inputs.q_seq, inputs.g_seq))
            if q is not None and g is not None
        ]
        counts = sum((e.query_counts for e in excluders), np.zeros(inputs.n_q, dtype=np.int64))
        return cls(PairIndex.of_values(inputs.q_lab, inputs.g_lab), excluders, counts)

    def excluded(self, lo: int, hi: int, n_g: int) -> np.ndarray:
        """Sorted unique flat indices of the excluded pairs of queries lo..hi-1."""
        parts = [e.flat_pairs(lo, hi, n_g) for e in self.excluders]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def plan_blocks(n_q: int, n_g: int, block_size: Optional[int], pair_counts: np.ndarray) -> list[tuple[int, int]]:
    """Query blocks [lo, hi): at most `block_size` rows (None: a block's float32 distances fit BLOCK_BYTES) and at
    most PAIR_BUDGET pairs (`pair_counts[i]`: the pairs of query i), but at least one row each."""
    max_rows = max(1, BLOCK_BYTES // (4 * n_g)) if block_size is None else int(block_size)
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


__all__ = ["BLOCK_BYTES", "PAIR_BUDGET", "PairIndex", "Pairs", "joint_codes", "plan_blocks"]
