"""Publishing one validation pass: metrics to the tracker (step = epoch), metrics.json, the worst-query grid and its
CSV, and the t-SNE plot when asked. Used by the validation callback and by validate(cfg); no Lightning here.

The pictures come after the metrics and never end a job: a picture that fails is a warning, the metrics, metrics.json
and the run's status stay what they are."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch

from metriclab.core.atomic import write_json_atomic
from metriclab.data.datasets import ValidationData
from metriclab.evaluation.pictures import save_tsne, save_worst_queries
from metriclab.evaluation.report import RetrievalReport
from metriclab.evaluation.spec import as_evaluation_config
from metriclab.evaluation.verification import fmr_key
from metriclab.evaluation.verification_pictures import distance_histograms_figure, roc_figure

log = logging.getLogger(__name__)


def draw_or_warn(picture: str, draw: Callable[[], List[Path]]) -> List[Path]:
    """The files `draw()` wrote, or none with a warning naming `picture` when it fails (a missing image, a plotting
    or t-SNE error): a picture is a convenience, the metrics are the result."""
    try:
        return draw()
    except Exception as e:  # noqa: BLE001  (any failure of a picture is reported, never raised)
        log.warning("%s skipped: %s: %s", picture, type(e).__name__, e)
        return []


def publish_validation(
    report: RetrievalReport, embeddings: torch.Tensor, data: ValidationData, cfg: Any, tracked: Any,
    run_dir: Optional[Path], epoch: int, tag: Optional[str] = None, target_fmr: Optional[float] = None,
) -> None:
    """Log metrics (step = epoch), write metrics.json, the worst-query grid + CSV and (if asked) the t-SNE plot.
    `cfg`: the `evaluation` group (`EvaluationConfig`, or its DictConfig). `tracked`: a `TrackedRun` or None (no
    tracker); `run_dir` None writes no file. `tag` (e.g. "init") keeps a special pass apart: metrics `<tag>/...`,
    files under `<tag>/`. With verification metrics in `report`: the ROC and the distance histograms with the
    threshold at `target_fmr` (the calibration's operating point; default the middle of `fmr_vals`)."""
    cfg = as_evaluation_config(cfg)  # a misspelt key stays a usage error, not a skipped picture
    metrics = {k: float(v) for k, v in report.metrics.items()}
    prefix, folder = (tag, tag) if tag else ("val", f"epoch_{epoch:03d}")
    if tracked is not None:
        tracked.log_metrics({f"{prefix}/{k}": v for k, v in metrics.items()}, step=epoch)
    if run_dir is None:
        return
    write_json_atomic(run_dir / ("metrics.json" if not tag else f"metrics_{tag}.json"), metrics)
    title = folder.replace("_", " ")
    files = draw_or_warn(f"worst-query grid {run_dir / 'worst_queries' / folder}", lambda: save_worst_queries(
        report, data, embeddings, run_dir / "worst_queries" / folder, cfg, title=title))
    image_key = f"{tag}/" if tag else ""
    if tracked is not None:
        for f in files:
            tracked.log_artifact(f, f"worst_queries/{folder}")
            if f.suffix == ".png":
                tracked.log_step_image(f, f"{image_key}worst_queries", step=epoch)
    if cfg.tsne:
        png = run_dir / "plots" / folder / "tsne.png"
        plots = draw_or_warn(f"t-SNE plot {png}", lambda: [p for p in [save_tsne(
            embeddings, data.labels, png, int(cfg.tsne_max_points), title=title)] if p is not None])
        if tracked is not None:
            for f in plots:
                tracked.log_artifact(f, f"plots/{folder}")
                tracked.log_step_image(f, f"{image_key}tsne", step=epoch)
    if report.verification is not None:
        _publish_verification(report, tracked, run_dir / "plots" / folder, folder, image_key, epoch, target_fmr)


def _publish_verification(report: RetrievalReport, tracked: Any, folder_path: Path, folder: str, image_key: str,
                          epoch: int, target_fmr: Optional[float]) -> None:
    result = report.verification
    target = target_fmr if target_fmr is not None else sorted(result.fmr_vals)[len(result.fmr_vals) // 2]
    threshold = report.metrics.get(f"threshold@fmr_{fmr_key(float(target))}", float("nan"))
    drawn = draw_or_warn(f"ROC picture in {folder_path}", lambda: _some(roc_figure(result, folder_path / "roc.png")))
    drawn += draw_or_warn(f"distance histograms in {folder_path}", lambda: _some(
        distance_histograms_figure(result, folder_path / "distances.png", threshold)))
    for f in drawn:
        if tracked is not None:
            tracked.log_artifact(f, f"plots/{folder}")
            tracked.log_step_image(f, f"{image_key}{f.stem}", step=epoch)


def _some(path: Optional[Path]) -> List[Path]:
    return [] if path is None else [path]
