"""What a person looks at after validation: the worst-query grid and its CSV, the t-SNE plot, the metrics table.

The metrics come from `metriclab.evaluation.validation` (the metric engine over the validation rows).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")  # headless: figures are files
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from metriclab.core.atomic import atomic_savefig, write_csv_atomic  # noqa: E402
from metriclab.data.datasets import ValidationData, class_names  # noqa: E402
from metriclab.evaluation.report import PLAIN_PREFIX, RetrievalReport  # noqa: E402
from metriclab.evaluation.spec import EvaluationConfigLike, as_evaluation_config  # noqa: E402

log = logging.getLogger(__name__)


def select_worst_queries(report: RetrievalReport, n: int) -> pd.DataFrame:
    """The n valid queries with the lowest AP; ties go to the later first true match, then the query index.
    Backends without AP (faiss: `ap` is NaN): the n valid queries with the latest first true match (none within the
    searched list first), then the query index."""
    pq = report.per_query
    valid = pq[pq["valid"]].copy()
    valid["_rank_key"] = valid["first_hit_rank"].where(valid["first_hit_rank"] > 0, np.iinfo(np.int64).max)
    if _has_ap(report):
        worst = valid.sort_values(["ap", "_rank_key", "query_index"], ascending=[True, False, True]).head(n)
    else:
        worst = valid.sort_values(["_rank_key", "query_index"], ascending=[False, True]).head(n)
    return worst.drop(columns="_rank_key")


def _has_ap(report: RetrievalReport) -> bool:
    """Only the exact backend ranks the whole gallery, so only it gives AP."""
    return report.backend == "exact"


def read_tile(path: Path, size: int = 128) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    img.thumbnail((size, size))
    return np.asarray(img)


def style_tile(ax: plt.Axes, image: Any, caption: str, color: str) -> None:
    """One tile of every image grid: the image, a small black caption above it, a thick `color` frame, no ticks."""
    ax.imshow(image)
    ax.set_title(caption, fontsize=6.5, color="black")
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(4)
    ax.set_xticks([])
    ax.set_yticks([])


def _missed_true_matches(
    report: RetrievalReport, qi: int, q_row: int, g_rows: np.ndarray, labels: np.ndarray, seq: Optional[np.ndarray],
    embeddings: torch.Tensor, n_missed: int,
) -> List[Tuple[int, float]]:
    """True matches of query qi (dataset row q_row) that are not in its shown top-k (excluded pairs left out),
    nearest first. `g_rows`, `labels`, `seq`: the gallery rows, labels and sequences of the validation data."""
    true = (labels[g_rows] == labels[q_row]) & (g_rows != q_row)
    if seq is not None:
        true &= seq[g_rows] != seq[q_row]
    shown = set(report.topk_ids[qi][report.topk_ids[qi] >= 0].tolist())
    cand = [j for j in np.flatnonzero(true) if j not in shown]
    if not cand:
        return []
    e = embeddings.float()
    d = _pair_distance(e[q_row][None], e[g_rows[cand]], report.distance)
    order = np.argsort(d, kind="stable")[:n_missed]
    return [(int(cand[i]), float(d[i])) for i in order]


def _pair_distance(a: torch.Tensor, b: torch.Tensor, distance: str) -> np.ndarray:
    if distance == "cosine":
        return (1 - torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T)[0].numpy()
    return torch.cdist(a, b)[0].numpy()


def _grid_title(report: RetrievalReport, n_rows: int, k: int, title: str) -> str:
    """The grid's title: `title`, the rule the rows were selected by, the colours and the distance."""
    if _has_ap(report):
        rule = f"{n_rows} worst queries by AP (lowest AP first; ties: later first true match). "
    else:
        rule = (f"{n_rows} worst queries by first-hit rank (no true match in the searched list first, then the "
                f"latest first true match; backend {report.backend.split(' (')[0]} gives no AP). ")
    after = "" if report.postprocess == "none" else f", ranking after post-processing: {report.postprocess}"
    return (f"{title}\n{rule}Green = right, red = wrong, gray = true matches missed from the top {k}. "
            f"Distance: {report.distance}{after}")


def draw_worst_queries(
    report: RetrievalReport,
    data: ValidationData,
    embeddings: torch.Tensor,
    out_png: Path,
    n_queries: int = 5,
    n_missed: int = 2,
    title: str = "",
) -> Optional[pd.DataFrame]:
    """Grid: each row is a query, its top-k gallery images, then true matches it missed. Returns the rows drawn."""
    worst = select_worst_queries(report, n_queries)
    if worst.empty:
        return None
    q_rows, g_rows = np.flatnonzero(data.is_query), np.flatnonzero(data.is_gallery)
    with_ap = _has_ap(report)
    k = report.topk_ids.shape[1]
    n_cols = 1 + k + n_missed
    fig, axes = plt.subplots(len(worst), n_cols, figsize=(1.9 * n_cols, 2.3 * len(worst) + 0.6), squeeze=False)
    paths, labels, seq = data.paths, data.labels, data.sequences
    names = class_names(data.df)  # a converter's `class_name` column reads better than the integer label

    def tile(ax, row: int, caption: str, color: str) -> None:
        style_tile(ax, read_tile(data.root / paths[row]), caption, color)

    for r, (_, q) in enumerate(worst.iterrows()):
        qi = int(q["query_index"])
        q_row = q_rows[qi]
        for ax in axes[r]:
            ax.axis("off")
        axes[r][0].axis("on")
        rank = int(q["first_hit_rank"])
        ap = f"AP {q['ap']:.3f}, " if with_ap else ""
        tile(axes[r][0], q_row, f"QUERY {names[q_row]}\n{Path(paths[q_row]).name}\n"
             f"{ap}1st hit {rank if rank else '-'}", "blue")
        for c in range(k):
            j = int(report.topk_ids[qi, c])
            if j < 0:
                continue
            g_row = g_rows[j]
            ok = labels[g_row] == labels[q_row]
            axes[r][1 + c].axis("on")
            tile(axes[r][1 + c], g_row, f"#{c + 1} {names[g_row]}\n{Path(paths[g_row]).name}\n"
                 f"d={report.topk_distances[qi, c]:.3f}", "green" if ok else "red")
        missed = _missed_true_matches(report, qi, q_row, g_rows, labels, seq, embeddings, n_missed)
        for c, (j, dist) in enumerate(missed):
            g_row = g_rows[j]
            axes[r][1 + k + c].axis("on")
            tile(axes[r][1 + k + c], g_row, f"MISSED {names[g_row]}\n{Path(paths[g_row]).name}\n"
                 f"d={dist:.3f}", "gray")
    fig.suptitle(_grid_title(report, len(worst), k, title), fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_png)
    plt.close(fig)
    return worst


def worst_queries_table(worst: pd.DataFrame, data: ValidationData) -> pd.DataFrame:
    q_rows = np.flatnonzero(data.is_query)
    rows = q_rows[worst["query_index"].to_numpy()]
    return pd.DataFrame({
        "query_index": worst["query_index"].to_numpy(),
        "path": data.paths[rows],
        "label": data.labels[rows],
        "first_hit_rank": worst["first_hit_rank"].to_numpy(),
        "ap": worst["ap"].to_numpy(),
    })


def save_worst_queries(
    report: RetrievalReport, data: ValidationData, embeddings: torch.Tensor, out_dir: Path,
    cfg: EvaluationConfigLike, title: str = "",
) -> List[Path]:
    """`out_dir/worst_queries.png` + `worst_queries.csv`; returns the files written (none if no valid query).
    `cfg`: the `evaluation` group (`EvaluationConfig`, or its config node, built here)."""
    cfg = as_evaluation_config(cfg)
    png, csv = out_dir / "worst_queries.png", out_dir / "worst_queries.csv"
    worst = draw_worst_queries(report, data, embeddings, png, cfg.worst_queries, cfg.grid_missed, title)
    if worst is None:
        return []
    write_csv_atomic(worst_queries_table(worst, data), csv)
    return [png, csv]


def _cell(key: str, value: Any) -> str:
    is_count = key.rsplit("/", 1)[-1].startswith("n_") and float(value).is_integer()
    return str(int(value)) if is_count else f"{value:.4f}"


def format_metrics_table(metrics: Dict[str, Any]) -> str:
    """The metrics as a text table, one per line. With post-processing (`plain/<metric>` keys beside the
    post-processed `<metric>`), two columns side by side: plain and post-processed."""
    plain = {k[len(PLAIN_PREFIX):]: v for k, v in metrics.items() if k.startswith(PLAIN_PREFIX)}
    rows = {k: v for k, v in metrics.items() if not k.startswith(PLAIN_PREFIX)}
    width = max(len(k) for k in rows) if rows else 0
    if not plain:
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ------"]
        lines += [f"{k:<{width}}  {_cell(k, rows[k])}" for k in sorted(rows)]
        return "\n".join(lines)
    lines = [f"{'metric':<{width}}  {'plain':>8}  post-processed", f"{'-' * width}  {'-' * 8}  --------------"]
    for k in sorted(rows):
        before = _cell(k, plain[k]) if k in plain else "-"
        lines.append(f"{k:<{width}}  {before:>8}  {_cell(k, rows[k])}")
    return "\n".join(lines)


#: fewer distinct points than this make no picture (t-SNE needs neighbours to place a point among)
TSNE_MIN_POINTS = 5
#: the sample is reduced to this many principal components before the t-SNE: the neighbourhoods barely change and
#: the neighbour search and PCA initialisation get several times cheaper at D = 512
TSNE_PCA_DIMS = 50
#: gradient steps (250 of them early exaggeration): the layout has settled by then, at half sklearn's default cost
TSNE_MAX_ITER = 500
#: Barnes-Hut accuracy: 0.8 halves the cost of a step against sklearn's 0.5 for a layout as trustworthy (0.693 vs
#: 0.697, 10 neighbours, at Market size: bench/bench_validate.py's data)
TSNE_ANGLE = 0.8


def tsne_skip_reason(x: np.ndarray) -> Optional[str]:
    """Why `x` (n x d) can make no t-SNE picture, or None. Collapsed rows (an untrained or broken model) crash
    sklearn's Barnes-Hut t-SNE with a segfault, which no `except` catches, so they are found before it runs."""
    if x.ndim != 2 or x.shape[1] < 2:
        return f"the embeddings have {x.shape[1] if x.ndim == 2 else x.ndim} dimension(s), a 2-D map needs at least 2"
    if not np.isfinite(x).all():
        return "the embeddings contain NaN or inf"
    x64 = x.astype(np.float64)
    n_distinct = len(np.unique(x64, axis=0))
    if n_distinct < TSNE_MIN_POINTS:
        return (f"only {n_distinct} distinct point(s) among {len(x)} embeddings (at least {TSNE_MIN_POINTS} "
                f"needed; all rows equal = a collapsed or untrained model)")
    spread, scale = float(np.ptp(x64, axis=0).max()), float(np.abs(x64).max())
    if spread <= 1e-6 * max(scale, 1e-12):
        return f"the {len(x)} embeddings are one point up to rounding (spread {spread:.2e} at scale {scale:.2e})"
    return None


def tsne_coordinates(x: np.ndarray, seed: int = 0, pca_dims: Optional[int] = TSNE_PCA_DIMS,
                     max_iter: int = TSNE_MAX_ITER, angle: float = TSNE_ANGLE) -> np.ndarray:
    """2-D t-SNE coordinates of the rows of `x`: PCA to `pca_dims` first (when D is larger), then `max_iter`
    steps at Barnes-Hut `angle`. `pca_dims=None, max_iter=1000, angle=0.5` is sklearn's plain default (what the
    benchmark compares against)."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    x = x.astype(np.float32)
    if pca_dims is not None and x.shape[1] > pca_dims and len(x) > pca_dims:
        x = PCA(pca_dims, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, max(2.0, (len(x) - 1) / 3)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=max_iter,
                angle=angle).fit_transform(x)


def save_tsne(embeddings: torch.Tensor, labels: np.ndarray, out_png: Path, max_points: int, seed: int = 0,
              title: str = "") -> Optional[Path]:
    """t-SNE of (a random sample of) the embeddings, one colour per label; None (with a warning naming the
    reason) when the sample is degenerate: too few distinct points, fewer than 2 dimensions, or collapsed."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(labels)) if len(labels) <= max_points else np.sort(rng.choice(len(labels), max_points, False))
    x = embeddings[idx].numpy()
    reason = tsne_skip_reason(x)
    if reason is not None:
        log.warning("t-SNE plot %s skipped: %s", out_png, reason)
        return None
    xy = tsne_coordinates(x, seed)
    fig, ax = plt.subplots(figsize=(7, 7))
    lab = labels[idx]
    uniq = np.unique(lab)
    cmap = plt.get_cmap("tab20" if len(uniq) > 10 else "tab10")
    for i, u in enumerate(uniq):
        m = lab == u
        ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(i % cmap.N), label=str(u) if len(uniq) <= 20 else None)
    if len(uniq) <= 20:
        ax.legend(fontsize=7, markerscale=2, loc="best")
    reduced = f", after PCA to {TSNE_PCA_DIMS} dims" if x.shape[1] > TSNE_PCA_DIMS and len(x) > TSNE_PCA_DIMS else ""
    ax.set_title(f"{title}\nt-SNE of {len(idx)} of {len(labels)} validation embeddings{reduced}, coloured by label",
                 fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=100)
    plt.close(fig)
    return out_png
