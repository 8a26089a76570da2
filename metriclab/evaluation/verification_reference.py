"""The verification metrics' definitions applied directly to given distance arrays (`verification_from_distances`),
the result they give, and the pieces the blocked computation (`metriclab.evaluation.verification`) shares with it.
The definitions are in `metriclab.evaluation.verification`'s docstring."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import numpy as np

#: the FMR values reported by default
DEFAULT_FMR_VALS = (0.1, 0.01, 0.001)
#: bins of the pass-1 histogram of the negative distances
N_BINS = 1 << 16
#: default block: at most this many (query, gallery) distances at once (8 MB of float32; with the bin indices and
#: masks a block needs ~4x that)
BLOCK_PAIRS = 1 << 21
#: gallery rows centred / normalised at a time (a 4 MB buffer at D = 512)
GALLERY_CHUNK = 2048
#: bins of the negative-distance histogram kept in the result (for the picture); divides N_BINS
PICTURE_BINS = 256
#: FMR / FNMR levels the ROC curve points are picked at
CURVE_LEVELS = 200


@dataclass
class VerificationResult:
    """The metrics (module docstring) and what the pictures need.

    ``pos``: the positive distances (sorted). ``neg_hist_counts`` / ``neg_hist_edges``: a histogram of the negative
    distances. ``curve_fmr`` / ``curve_fnmr``: points (FMR(t), FNMR(t)) of the ROC, FMR ascending, from accepting
    nothing to accepting all. ``operating_points[x] = (FMR, FNMR)`` at ``threshold@fmr_<x>`` (the FMR reached, <= x).
    """

    metrics: dict[str, float]
    fmr_vals: tuple[float, ...]
    n_pos_pairs: int
    n_neg_pairs: int
    pos: np.ndarray
    neg_hist_counts: np.ndarray
    neg_hist_edges: np.ndarray
    curve_fmr: np.ndarray
    curve_fnmr: np.ndarray
    operating_points: dict[float, tuple[float, float]] = field(default_factory=dict)
    distance: str = "euclidean"


def fmr_key(x: float) -> str:
    return f"{x:g}"


def check_fmr_vals(fmr_vals: Iterable[float]) -> tuple[float, ...]:
    """The FMR values as floats in (0, 1), duplicates dropped (first kept)."""
    if isinstance(fmr_vals, (int, float)):
        fmr_vals = (fmr_vals,)
    vals: list[float] = []
    for v in fmr_vals:
        x = float(v)
        if not 0.0 < x < 1.0:
            raise ValueError(f"fmr_vals must be fractions in (0, 1) (not percent), got {v!r}")
        if x not in vals:
            vals.append(x)
    if not vals:
        raise ValueError("fmr_vals is empty: give at least one FMR value in (0, 1)")
    return tuple(vals)


def count_limit(x: float, n: int) -> int:
    """The largest count c in [0, n] with ``c / n <= x`` (float64 division, as FMR is computed)."""
    c = min(int(math.floor(x * n)), n)
    while c < n and (c + 1) / n <= x:
        c += 1
    while c > 0 and c / n > x:
        c -= 1
    return c


def below(value: float, dtype: np.dtype) -> float:
    """The largest float of `dtype` below `value`."""
    return float(np.nextafter(np.asarray(value, dtype=dtype), np.asarray(-np.inf, dtype=dtype)))


def nan_metrics(fmr_vals: Sequence[float]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for x in fmr_vals:
        metrics[f"fnmr@fmr_{fmr_key(x)}"] = math.nan
    for x in fmr_vals:
        metrics[f"threshold@fmr_{fmr_key(x)}"] = math.nan
    metrics["eer"] = math.nan
    metrics["eer_threshold"] = math.nan
    return metrics


def degenerate(n_pos: int, n_neg: int, fmr_vals: tuple[float, ...], pos: np.ndarray, distance: str,
                stacklevel: int) -> Optional[VerificationResult]:
    """A NaN result (with a warning) when there is no positive or no negative pair, else None."""
    if n_pos > 0 and n_neg > 0:
        return None
    missing = "positive (same label)" if n_pos == 0 else "negative (other label)"
    warnings.warn(f"verification metrics are NaN: there is no {missing} pair after exclusions "
                  f"({n_pos} positive, {n_neg} negative pairs)", stacklevel=stacklevel + 1)
    empty = np.zeros(0)
    return VerificationResult(nan_metrics(fmr_vals), fmr_vals, n_pos, n_neg, np.sort(pos), np.zeros(0, np.int64),
                              empty, empty, empty, {}, distance)


def fnmr_at(sorted_pos: np.ndarray, t: float) -> float:
    return (len(sorted_pos) - int(np.searchsorted(sorted_pos, t, side="right"))) / len(sorted_pos)


def metrics_dict(fnmr: dict[float, float], thr: dict[float, float], eer: float, eer_thr: float) -> dict[str, float]:
    metrics = {f"fnmr@fmr_{fmr_key(x)}": v for x, v in fnmr.items()}
    metrics.update({f"threshold@fmr_{fmr_key(x)}": v for x, v in thr.items()})
    metrics["eer"], metrics["eer_threshold"] = eer, eer_thr
    return metrics


def verification_from_distances(pos: np.ndarray, neg: np.ndarray,
                                fmr_vals: Iterable[float] = DEFAULT_FMR_VALS) -> VerificationResult:
    """The metrics of the module docstring from the positive and negative pair distances (1-D arrays), computed
    literally: every distinct value is a candidate threshold. The reference `verification_metrics` equals."""
    fmr_vals = check_fmr_vals(fmr_vals)
    pos, neg = np.asarray(pos).ravel(), np.asarray(neg).ravel()
    dtype = np.result_type(pos.dtype, neg.dtype) if pos.dtype.kind == neg.dtype.kind == "f" else np.dtype(np.float64)
    pos, neg = np.sort(pos.astype(dtype)), np.sort(neg.astype(dtype))
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("verification_from_distances: the distances must be finite (no NaN/inf)")
    n_pos, n_neg = len(pos), len(neg)
    bad = degenerate(n_pos, n_neg, fmr_vals, pos, "given", stacklevel=2)
    if bad is not None:
        return bad
    uniq, counts = np.unique(neg, return_counts=True)
    fmr_at = np.cumsum(counts) / n_neg  # FMR at each distinct negative value
    fnmr, thr, points = {}, {}, {}
    for x in fmr_vals:
        ok = np.flatnonzero(fmr_at <= x)
        t = float(uniq[ok[-1]]) if len(ok) else below(float(uniq[0]), dtype)
        thr[x], fnmr[x] = t, fnmr_at(pos, t)
        points[x] = (float(fmr_at[ok[-1]]) if len(ok) else 0.0, fnmr[x])
    cands = np.unique(np.concatenate([pos, neg]))
    fmr_c = np.concatenate([[0.0], np.searchsorted(neg, cands, side="right") / n_neg])
    fnmr_c = np.concatenate([[1.0], (n_pos - np.searchsorted(pos, cands, side="right")) / n_pos])
    worst = np.maximum(fmr_c, fnmr_c)
    best = int(np.argmin(worst))  # the first: the smallest threshold attaining the minimum
    eer_thr = float(cands[best - 1]) if best > 0 else below(float(cands[0]), dtype)
    # the ROC: at most ~2 * CURVE_LEVELS candidate thresholds, spread over log FMR and over FNMR
    pick = curve_picks(fmr_c, fnmr_c, n_neg)
    lo, hi = float(cands[0]), float(cands[-1])
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, PICTURE_BINS + 1)
    hist = np.histogram(neg, bins=edges)[0].astype(np.int64)
    return VerificationResult(metrics_dict(fnmr, thr, float(worst[best]), eer_thr), fmr_vals, n_pos, n_neg, pos,
                              hist, edges, fmr_c[pick], fnmr_c[pick], points, "given")


def curve_picks(fmr: np.ndarray, fnmr: np.ndarray, n_neg: int) -> np.ndarray:
    """Indices into the (FMR ascending, FNMR descending) points: the last point at or below each of CURVE_LEVELS
    log-spaced FMR levels and each of CURVE_LEVELS FNMR levels, plus both ends."""
    levels = np.logspace(math.log10(1.0 / n_neg), 0.0, CURVE_LEVELS)
    at_fmr = np.searchsorted(fmr, levels, side="right") - 1
    fnmr_levels = np.linspace(0.0, 1.0, CURVE_LEVELS)
    at_fnmr = len(fnmr) - np.searchsorted(-fnmr[::-1], -fnmr_levels, side="right")  # first point with fnmr <= level
    picks = np.concatenate([[0, len(fmr) - 1], at_fmr, at_fnmr])
    return np.unique(np.clip(picks, 0, len(fmr) - 1))


# --- over embeddings, in blocks --------------------------------------------------------------------------------


def threshold_at_fmr(result: VerificationResult, target_fmr: float) -> float:
    """The calibrated threshold (``threshold@fmr_<target>``) of `result`: accept a pair when its distance <= it.
    `target_fmr` must be one of ``result.fmr_vals`` (add it to ``fmr_vals`` when computing the result)."""
    x = float(target_fmr)
    if x not in result.fmr_vals:
        raise ValueError(f"target_fmr {target_fmr!r} was not computed (fmr_vals {result.fmr_vals}); pass it in "
                         "fmr_vals to verification_metrics / verification_from_distances")
    return result.metrics[f"threshold@fmr_{fmr_key(x)}"]


__all__ = ["BLOCK_PAIRS", "CURVE_LEVELS", "DEFAULT_FMR_VALS", "GALLERY_CHUNK", "N_BINS", "PICTURE_BINS",
           "VerificationResult", "below", "check_fmr_vals", "count_limit", "curve_picks", "degenerate", "fmr_key",
           "fnmr_at", "metrics_dict", "nan_metrics", "threshold_at_fmr", "verification_from_distances"]
