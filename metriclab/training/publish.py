"""Publishing one validation pass: metrics to the tracker (step = epoch), metrics.json, the worst-query grid and its
CSV, and the t-SNE plot when asked. Used by the validation callback and by validate(cfg); no Lightning here."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from metriclab.core.atomic import write_json_atomic
from metriclab.data.datasets import ValidationData
from metriclab.evaluation.pictures import save_tsne, save_worst_queries
from metriclab.evaluation.report import RetrievalReport


def publish_validation(
    report: RetrievalReport, embeddings: torch.Tensor, data: ValidationData, cfg: Any, tracked: Any,
    run_dir: Optional[Path], epoch: int, tag: Optional[str] = None,
) -> None:
    """Log metrics (step = epoch), write metrics.json, the worst-query grid + CSV and (if asked) the t-SNE plot.
    `cfg`: the `evaluation` group (`EvaluationConfig`, or its DictConfig). `tracked`: a `TrackedRun` or None (no
    tracker); `run_dir` None writes no file. `tag` (e.g. "init") keeps a special pass apart: metrics `<tag>/...`,
    files under `<tag>/`."""
    metrics = {k: float(v) for k, v in report.metrics.items()}
    prefix, folder = (tag, tag) if tag else ("val", f"epoch_{epoch:03d}")
    if tracked is not None:
        tracked.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=epoch)
    if run_dir is None:
        return
    write_json_atomic(run_dir / ("metrics.json" if not tag else f"metrics_{tag}.json"), metrics)
    files = save_worst_queries(report, data, embeddings, run_dir / "worst_queries" / folder, cfg,
                               title=folder.replace("_", " "))
    if tracked is not None:
        for f in files:
            tracked.log_artifact(f, f"worst_queries/{folder}")
    if cfg.tsne:
        png = save_tsne(embeddings, data.labels, run_dir / "plots" / folder / "tsne.png", int(cfg.tsne_max_points),
                        title=folder.replace("_", " "))
        if tracked is not None:
            tracked.log_artifact(png, f"plots/{folder}")
