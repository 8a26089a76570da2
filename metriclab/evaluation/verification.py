"""Verification metrics of query vs gallery embeddings: FNMR at a given FMR, its thresholds, and the EER.

A verification system accepts a pair as "the same identity" when its distance ``d <= t`` (the threshold).

Definitions:

- pairs: every (query i, gallery j) pair that the ranking engine does not exclude (`metriclab.evaluation.engine`:
  not the same dataset row id, not the same sequence). Positive pairs share a label, negative pairs do not.
  ``n_pos_pairs`` / ``n_neg_pairs`` count them.
- ``FMR(t) = #negatives with d <= t / n_neg`` (false match rate), ``FNMR(t) = #positives with d > t / n_pos`` (false
  non-match rate); both are plain float64 divisions of counts.
- ``threshold@fmr_<x>``: the largest t among the negative distance values with ``FMR(t) <= x``. Equal negative
  distances are accepted or rejected together, so a tie is never split to reach x exactly: FMR(t) <= x always holds
  and may be below x. When even the smallest negative has ``FMR > x`` (x < 1/n_neg, or a tie at the smallest
  value), t is the largest float below the smallest negative (``np.nextafter`` in the dtype of the distances:
  float32 for embeddings), so no negative is accepted. ``fnmr@fmr_<x> = FNMR(threshold@fmr_<x>)``. x lies in (0, 1)
  (fractions, not percent); keys format x with ``f"{x:g}"`` (``fnmr@fmr_0.001``).
- ``eer = min over t of max(FMR(t), FNMR(t))``, t over every distinct distance value (positive or negative) and -inf
  (accept nothing: FMR 0, FNMR 1). With finite sets FMR and FNMR rarely meet exactly; this min-max form is the
  standard discrete EER (it equals the crossing value when they do meet). ``eer_threshold``: the smallest t that
  attains it; when that is -inf, the largest float below the smallest distance.
- no positive or no negative pair: every metric is NaN and a warning says which is missing.

OML's ``calc_fnmr_at_fmr`` differs: its threshold is numpy's linearly interpolated quantile of the negatives (a value
between two negatives in general) and it counts ``d >= threshold`` as a non-match; with distinct negatives both give
the same FNMR unless a positive lies strictly between the two negatives around OML's quantile.

Two implementations with the same numbers: `verification_from_distances` (the reference: the definitions applied to
given distance arrays) and `verification_metrics` (over embeddings, in query blocks, with bounded memory: it never
holds the Q x G distances). The blocked one makes two passes over the blocks. Pass 1: the positive distances are
kept (they are few), the negatives are counted into a histogram of `N_BINS` equal bins over [0, an upper bound of
the distances] (the bin of ``d`` is ``floor(d * scale)``, monotone in d, values past the bound in the last bin).
From those counts: the bin holding each needed order statistic of the negatives (the (c+1)-th smallest, c the most
negatives FMR <= x allows), the bin where FMR(t) - FNMR(t) turns >= 0 (the EER crossing; the positives are binned
by the same function) and the nearest non-empty bin below each of them. Pass 2 recomputes the same blocks and keeps
only the negatives in those few bins, as (value, count) pairs, and everything is finished exactly from them
(pass 2's counts are checked against pass 1's). Both passes compute the distances with the same code on the same
blocks, so they are bit-identical.

Distances (float32, CPU, as `verification_metrics` computes them): euclidean ``sqrt(max(|q|^2 + |g|^2 - 2 q.g, 0))``
of rows centred at the joint mean of both sides (the engine's trick: distances do not change, cancellation
shrinks), the matrix product by torch (``addmm``); cosine ``max(1 - q.g, 0)`` of unit-normalised copies. These are
the distances the engine reports (euclidean, not squared), up to float32 rounding (the engine reports top-k
distances recomputed in float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np
import torch

from metriclab.core.constants import DISTANCES
from metriclab.evaluation.blocks import Pairs, plan_blocks
from metriclab.evaluation.inputs import CheckedInputs, check_inputs, joint_mean, squared_norms, unit_rows
from metriclab.evaluation.spec import RetrievalSide
from metriclab.evaluation.verification_reference import (
    BLOCK_PAIRS,
    DEFAULT_FMR_VALS,
    GALLERY_CHUNK,
    N_BINS,
    PICTURE_BINS,
    VerificationResult,
    below,
    check_fmr_vals,
    count_limit,
    curve_picks,
    degenerate,
    fmr_key,
    fnmr_at,
    metrics_dict,
    threshold_at_fmr,
    verification_from_distances,
)


class BlockDistances:
    """The float32 distances of a block of queries against the whole gallery (module docstring), the same bits
    every time a block is computed. Only the query side is copied (centred / unit rows); the gallery is centred or
    normalised GALLERY_CHUNK rows at a time into a reused buffer, so no gallery-sized copy is held."""

    def __init__(self, inputs: CheckedInputs, distance: str):
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance = distance
        self.g_raw = inputs.g_emb
        self.chunk = torch.empty(min(GALLERY_CHUNK, inputs.n_g), inputs.g_emb.shape[1], dtype=torch.float32)
        if distance == "cosine":
            self.q_side = unit_rows(inputs.q_emb, "query_embeddings")
            norms = torch.linalg.vector_norm(inputs.g_emb, dim=1)
            if bool((norms == 0).any()):
                unit_rows(inputs.g_emb, "gallery_embeddings")  # raises, naming the zero rows
            self.g_scale: torch.Tensor = norms[:, None]  # gallery rows are divided by it (as unit_rows does)
            self.mean: Optional[torch.Tensor] = None
            self.q_sq: Optional[torch.Tensor] = None
            self.bound = 2.0
        else:
            self.mean = joint_mean(inputs.q_emb, inputs.g_emb)
            self.q_side = inputs.q_emb - self.mean
            self.q_sq = squared_norms(self.q_side)
            self.g_sq = torch.cat([(self._gallery(a, b) ** 2).sum(1)
                                   for a, b in self._chunks()]) if inputs.n_g else torch.zeros(0)
            # triangle inequality, with room for rounding
            self.bound = (math.sqrt(float(self.q_sq.max())) + math.sqrt(float(self.g_sq.max()))) * (1 + 1e-3)

    def _chunks(self) -> list[tuple[int, int]]:
        n_g, step = self.g_raw.shape[0], self.chunk.shape[0]
        return [(a, min(a + step, n_g)) for a in range(0, n_g, step)]

    def _gallery(self, a: int, b: int) -> torch.Tensor:
        """Gallery rows a..b-1, centred (euclidean) or unit (cosine), in the chunk buffer."""
        out = self.chunk[: b - a]
        if self.mean is not None:
            return torch.sub(self.g_raw[a:b], self.mean, out=out)
        return torch.div(self.g_raw[a:b], self.g_scale[a:b], out=out)

    def block(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        """Distances of queries lo..hi-1 to every gallery item, written into `out` [hi - lo, G]."""
        q = self.q_side[lo:hi]
        part = torch.empty(hi - lo, self.chunk.shape[0], dtype=torch.float32)
        for a, b in self._chunks():
            g = self._gallery(a, b)
            if self.q_sq is None:
                torch.mm(q, g.T, out=part[:, : b - a])
            else:
                torch.addmm(self.g_sq[None, a:b], q, g.T, beta=1, alpha=-2, out=part[:, : b - a])
            out[:, a:b] = part[:, : b - a]
        if self.q_sq is None:
            return out.neg_().add_(1.0).clamp_min_(0.0)
        return out.add_(self.q_sq[lo:hi, None]).clamp_min_(0.0).sqrt_()


class Binner:
    """``bin(d) = floor(d * scale)`` in float32, clamped to [0, N_BINS - 1]; d = -1 (a pair that is not a negative)
    gets -1. Monotone in d, so the negatives of a bin lie above those of every lower bin."""

    def __init__(self, bound: float):
        bound = bound if bound > 0 and math.isfinite(bound) else 1.0
        self.scale = torch.tensor(N_BINS / bound, dtype=torch.float32)
        self.bound = N_BINS / float(self.scale)

    def __call__(self, d: torch.Tensor) -> torch.Tensor:
        return (d * self.scale).clamp_(-1.0, N_BINS - 1).to(torch.int32)


def _mark_block(dist: BlockDistances, pairs: Pairs, lo: int, hi: int, out: torch.Tensor,
                keep_pos: bool) -> tuple[torch.Tensor, Optional[np.ndarray]]:
    """The block's distances with every pair that is not a negative set to -1; its positive distances if asked."""
    n_g = out.shape[1]
    block = dist.block(lo, hi, out)
    flat = block.view(-1)
    excluded = pairs.excluded(lo, hi, n_g)
    if len(excluded):
        flat[torch.from_numpy(excluded)] = -1.0
    pos_idx = torch.from_numpy(pairs.positives.flat_pairs(lo, hi, n_g))
    pos = None
    if keep_pos:
        values = flat[pos_idx].numpy()
        pos = values[values >= 0]  # excluded pairs are -1; a distance is >= 0
    flat[pos_idx] = -1.0
    return block, pos


@dataclass
class _Selected:
    """Pass 2: the negatives of the needed bins, as distinct values (ascending) with their counts and bins."""

    values: np.ndarray
    counts: np.ndarray
    bins: np.ndarray


class _Negatives:
    """Exact order statistics of the negatives from the pass-1 histogram and the values of the needed bins."""

    def __init__(self, hist: np.ndarray, sel: _Selected):
        self.hist, self.cum = hist, np.cumsum(hist)
        self.nonempty = np.flatnonzero(hist)
        self.sel = sel

    def bin_of_kth(self, k: int) -> int:
        return int(np.searchsorted(self.cum, k, side="left"))

    def below(self, b: int) -> Optional[int]:
        """The nearest non-empty bin below b."""
        i = int(np.searchsorted(self.nonempty, b)) - 1
        return int(self.nonempty[i]) if i >= 0 else None

    def in_bin(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        at = slice(*np.searchsorted(self.sel.bins, [b, b + 1]))
        return self.sel.values[at], self.sel.counts[at]

    def kth(self, k: int) -> float:
        """The k-th smallest negative (1-based)."""
        b = self.bin_of_kth(k)
        values, counts = self.in_bin(b)
        below = int(self.cum[b] - self.hist[b])
        return float(values[int(np.searchsorted(below + np.cumsum(counts), k, side="left"))])

    def largest_below(self, w: float, b: int) -> Optional[float]:
        """The largest negative < w, w a negative of bin b (None: no negative is smaller)."""
        values, _ = self.in_bin(b)
        smaller = values[values < w]
        if len(smaller):
            return float(smaller[-1])
        lower = self.below(b)
        return None if lower is None else float(self.in_bin(lower)[0][-1])

    def count_lt(self, w: float, b: int) -> int:
        """Negatives < w, w a negative of bin b."""
        values, counts = self.in_bin(b)
        return int(self.cum[b] - self.hist[b]) + int(counts[values < w].sum())

    @property
    def minimum(self) -> float:
        return float(self.in_bin(int(self.nonempty[0]))[0][0])


def verification_metrics(query: RetrievalSide, gallery: RetrievalSide, distance: str = "euclidean",
                         fmr_vals: Iterable[float] = DEFAULT_FMR_VALS,
                         block_size: Optional[int] = None) -> VerificationResult:
    """The metrics of the module docstring over the non-excluded (query, gallery) pairs, in blocks of `block_size`
    queries (None: ~BLOCK_PAIRS distances per block), never holding all Q x G distances. Same numbers as
    `verification_from_distances` on the same float32 distances."""
    fmr_vals = check_fmr_vals(fmr_vals)
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer))
                                   or block_size < 1):
        raise ValueError(f"block_size must be a positive integer or None, got {block_size!r}")
    inputs = check_inputs(query, gallery)
    pairs = Pairs.of(inputs)
    n_g = inputs.n_g
    rows = max(1, BLOCK_PAIRS // n_g) if block_size is None else int(block_size)
    blocks = plan_blocks(inputs.n_q, n_g, rows, pairs.positives.query_counts + pairs.excluded_counts)
    dist = BlockDistances(inputs, distance)
    binner = Binner(dist.bound)
    buffer = torch.empty(max(hi - lo for lo, hi in blocks), n_g, dtype=torch.float32)

    neg_hist, pos = _pass_one(dist, pairs, blocks, buffer, binner)
    n_pos, n_neg = len(pos), int(neg_hist.sum())
    bad = degenerate(n_pos, n_neg, fmr_vals, pos, distance, stacklevel=2)
    if bad is not None:
        return bad

    # the bins to read exactly: the smallest negative, each (c+1)-th negative, the EER crossing, and the non-empty
    # bin below each of them
    cum = np.cumsum(neg_hist)
    pos_bins = binner(torch.from_numpy(pos)).numpy().astype(np.int64)
    pos_gt = n_pos - np.cumsum(np.bincount(pos_bins, minlength=N_BINS))  # positives in higher bins
    crossing = int(np.argmax(cum / n_neg >= pos_gt / n_pos))  # the first bin whose top has FMR >= FNMR
    limits = {x: count_limit(x, n_neg) for x in fmr_vals}
    nonempty = np.flatnonzero(neg_hist)
    targets = [int(nonempty[0]), crossing]
    targets += [int(np.searchsorted(cum, c + 1, side="left")) for c in limits.values() if c > 0]
    needed = set(targets)
    for b in targets:
        i = int(np.searchsorted(nonempty, b)) - 1
        if i >= 0:
            needed.add(int(nonempty[i]))
    sel = _select(dist, pairs, blocks, buffer, binner, needed, neg_hist)
    negs = _Negatives(neg_hist, sel)

    fnmr, thr, points = _operating_points(negs, pos, limits, n_neg)
    eer, eer_thr = _blocked_eer(negs, pos, pos_bins, crossing, n_neg)
    # the picture's histogram and the ROC at the tops of the bins
    edges = np.linspace(0.0, binner.bound, PICTURE_BINS + 1)
    coarse = neg_hist.reshape(PICTURE_BINS, -1).sum(1)
    fmr_c = np.concatenate([[0.0], cum / n_neg])
    fnmr_c = np.concatenate([[1.0], pos_gt / n_pos])
    pick = curve_picks(fmr_c, fnmr_c, n_neg)
    return VerificationResult(metrics_dict(fnmr, thr, eer, eer_thr), fmr_vals, n_pos, n_neg, pos, coarse, edges,
                              fmr_c[pick], fnmr_c[pick], points, distance)


def _pass_one(dist: BlockDistances, pairs: Pairs, blocks: list[tuple[int, int]], buffer: torch.Tensor,
              binner: Binner) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1: the histogram of the negatives (N_BINS counts) and the positive distances (sorted float32)."""
    hist = torch.zeros(N_BINS + 1, dtype=torch.int64)
    pos_parts = []
    for lo, hi in blocks:
        block, pos_block = _mark_block(dist, pairs, lo, hi, buffer[: hi - lo], keep_pos=True)
        assert pos_block is not None
        pos_parts.append(pos_block)
        hist += torch.bincount(binner(block).view(-1).add_(1), minlength=N_BINS + 1)
    return hist[1:].numpy(), np.sort(np.concatenate(pos_parts).astype(np.float32))


def _operating_points(negs: _Negatives, pos: np.ndarray, limits: dict[float, int], n_neg: int) -> tuple[
        dict[float, float], dict[float, float], dict[float, tuple[float, float]]]:
    """(FNMR, threshold, (FMR reached, FNMR)) at each FMR value x, c = limits[x] the most negatives it allows."""
    fnmr, thr, points = {}, {}, {}
    for x, c in limits.items():
        t: Optional[float] = None
        reached = 0  # negatives accepted at the threshold
        if c > 0:  # the largest negative below the (c+1)-th one (ties stay together)
            b = negs.bin_of_kth(c + 1)
            w = negs.kth(c + 1)
            t, reached = negs.largest_below(w, b), negs.count_lt(w, b)
        if t is None:
            t = below(negs.minimum, np.dtype(np.float32))
        thr[x], fnmr[x] = t, fnmr_at(pos, t)
        points[x] = (reached / n_neg, fnmr[x])
    return fnmr, thr, points


def _select(dist: BlockDistances, pairs: Pairs, blocks: list[tuple[int, int]], buffer: torch.Tensor,
            binner: Binner, needed: set[int], neg_hist: np.ndarray) -> _Selected:
    """Pass 2: the distinct negative values in the `needed` bins with their counts; checked against pass 1."""
    lut = np.zeros(N_BINS + 1, dtype=bool)
    lut[np.array(sorted(needed)) + 1] = True
    parts_v, parts_c = [], []
    for lo, hi in blocks:
        block, _ = _mark_block(dist, pairs, lo, hi, buffer[: hi - lo], keep_pos=False)
        flat = block.view(-1)
        index = binner(flat).add_(1).numpy()
        values, counts = np.unique(flat.numpy()[lut[index]], return_counts=True)  # numpy: 5x faster here
        parts_v.append(values)
        parts_c.append(counts)
    values, inverse = np.unique(np.concatenate(parts_v), return_inverse=True)
    counts = np.bincount(inverse, weights=np.concatenate(parts_c), minlength=len(values)).astype(np.int64)
    bins = binner(torch.from_numpy(values)).numpy().astype(np.int64)
    got = np.bincount(bins, weights=counts, minlength=N_BINS)
    want = np.zeros(N_BINS)
    want[sorted(needed)] = neg_hist[sorted(needed)]
    if not np.array_equal(got, want):
        raise RuntimeError("verification_metrics: the two passes over the blocks gave different distances "
                           "(the matrix product is not reproducible here); please report this")
    return _Selected(values, counts, bins)


def _blocked_eer(negs: _Negatives, pos: np.ndarray, pos_bins: np.ndarray, crossing: int,
                 n_neg: int) -> tuple[float, float]:
    """EER and its threshold. `crossing`: the first bin whose top has FMR >= FNMR. The smallest candidate t* with
    FMR(t*) >= FNMR(t*) lies in it; the candidate before t* (t_prev) lies there, in the non-empty bin below it, in a
    bin between them (a positive) or, when no negative is below the crossing bin, is a positive in any lower bin or
    -inf. All those candidates have exact FMR from the selected bins. FMR - FNMR grows with t, so the minimum of
    max(FMR, FNMR) is FMR(t*) or FNMR(t_prev), and FNMR(t_prev) is first reached at the largest positive <= t_prev."""
    n_pos = len(pos)
    low = negs.below(crossing)
    window = [crossing] if low is None else [low, crossing]
    first = 0 if low is None else low  # no negative lies in bins first..crossing other than the window's
    values = np.concatenate([negs.in_bin(b)[0] for b in window])
    counts = np.concatenate([negs.in_bin(b)[1] for b in window])
    cands = np.unique(np.concatenate([values, pos[(pos_bins >= first) & (pos_bins <= crossing)]]))
    below_window = int(negs.cum[window[0]] - negs.hist[window[0]])
    n_le = below_window + np.concatenate([[0], np.cumsum(counts)])[np.searchsorted(values, cands, side="right")]
    fmr = n_le / n_neg
    fnmr = (n_pos - np.searchsorted(pos, cands, side="right")) / n_pos
    star = int(np.argmax(fmr >= fnmr))
    if not fmr[star] >= fnmr[star]:
        raise AssertionError("verification_metrics: no EER crossing in the crossing bin")
    fnmr_prev, t_prev = (float(fnmr[star - 1]), float(cands[star - 1])) if star > 0 else (1.0, -math.inf)
    if fnmr_prev <= float(fmr[star]):
        i = int(np.searchsorted(pos, t_prev, side="right"))
        if i > 0:
            return fnmr_prev, float(pos[i - 1])
        return fnmr_prev, below(min(negs.minimum, float(pos[0])), np.dtype(np.float32))
    return float(fmr[star]), float(cands[star])


__all__ = ["BLOCK_PAIRS", "DEFAULT_FMR_VALS", "N_BINS", "BlockDistances", "Binner", "VerificationResult",
           "check_fmr_vals", "count_limit", "fmr_key", "threshold_at_fmr", "verification_from_distances",
           "verification_metrics"]
