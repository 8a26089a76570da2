"""Pictures of a `VerificationResult`: the ROC (FNMR against FMR) and the positive / negative distance histograms.

Both are written atomically and return the path; a result without positive or negative pairs (NaN metrics) or a
non-finite threshold makes no picture: a warning names the reason and None is returned, never an exception.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from metriclab.core.atomic import atomic_savefig  # noqa: E402
from metriclab.evaluation.verification import VerificationResult, fmr_key  # noqa: E402

log = logging.getLogger(__name__)


def _skip_reason(result: VerificationResult) -> Optional[str]:
    if result.n_pos_pairs == 0 or result.n_neg_pairs == 0:
        return f"{result.n_pos_pairs} positive and {result.n_neg_pairs} negative pairs (both are needed)"
    if not all(math.isfinite(v) for v in result.metrics.values()):
        return "the metrics are NaN"
    return None


def roc_figure(result: VerificationResult, path: Path | str) -> Optional[Path]:
    """FNMR against FMR (log x axis) with the ``threshold@fmr_<x>`` operating points and the EER marked."""
    reason = _skip_reason(result)
    if reason is not None:
        log.warning("ROC picture %s skipped: %s", path, reason)
        return None
    fmr, fnmr = result.curve_fmr, result.curve_fnmr
    floor = 0.5 / result.n_neg_pairs  # FMR 0 cannot sit on a log axis: drawn at half the smallest FMR step
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.step(np.maximum(fmr, floor), fnmr, where="post", color="tab:blue", label="FNMR(FMR)")
    for x, (at_fmr, at_fnmr) in result.operating_points.items():
        t = result.metrics[f"threshold@fmr_{fmr_key(x)}"]
        ax.plot(max(at_fmr, floor), at_fnmr, "o", ms=6, label=f"FMR <= {fmr_key(x)}: FNMR {at_fnmr:.4f} (t = {t:.4g})")
    eer = result.metrics["eer"]
    ax.plot(max(eer, floor), eer, "k*", ms=9, label=f"EER {eer:.4f} (t = {result.metrics['eer_threshold']:.4g})")
    ax.set_xscale("log")
    ax.set_xlim(floor, 1.0)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("FMR (false match rate)")
    ax.set_ylabel("FNMR (false non-match rate)")
    ax.set_title(f"Verification ROC, {result.distance} distance: {result.n_pos_pairs} positive, "
                 f"{result.n_neg_pairs} negative pairs", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return Path(path)


def distance_histograms_figure(result: VerificationResult, path: Path | str, threshold: float) -> Optional[Path]:
    """Densities of the positive and negative pair distances, with `threshold` as a vertical line."""
    reason = _skip_reason(result)
    if reason is None and not math.isfinite(threshold):
        reason = f"the threshold is {threshold}"
    if reason is None and len(result.neg_hist_edges) < 2:
        reason = "no negative-distance histogram"
    if reason is not None:
        log.warning("distance histogram picture %s skipped: %s", path, reason)
        return None
    edges = np.asarray(result.neg_hist_edges, dtype=np.float64)
    widths = np.diff(edges)
    neg_density = result.neg_hist_counts / (result.neg_hist_counts.sum() * widths)
    # the positives on the same grid, coarser when they are few
    n_bins = int(np.clip(len(result.pos) // 10, 10, len(widths)))
    pos_edges = np.linspace(edges[0], edges[-1], n_bins + 1)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.stairs(neg_density, edges, fill=True, alpha=0.45, color="tab:red",
              label=f"negative pairs ({result.n_neg_pairs})")
    ax.hist(np.clip(result.pos, edges[0], edges[-1]), bins=pos_edges, density=True, alpha=0.45, color="tab:green",
            label=f"positive pairs ({result.n_pos_pairs})")
    ax.axvline(threshold, color="black", ls="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel(f"{result.distance} distance")
    ax.set_ylabel("density")
    ax.set_title("Pair distances: accept a pair when its distance <= the threshold", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, path)
    plt.close(fig)
    return Path(path)


__all__ = ["distance_histograms_figure", "roc_figure"]
