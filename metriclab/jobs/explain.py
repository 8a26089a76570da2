"""GradCAM for retrieval: what in a query and in its retrieved images makes them close.

    python scripts/explain.py                                  # the newest training run (its best.ckpt, data, ...)
    python scripts/explain.py run=<run dir or MLflow run id>   # a train run (its best.ckpt) or a validate run
    python scripts/explain.py ckpt=outputs/train/<run>/checkpoints/best.ckpt dataset.root=/data/x transforms=...

For the worst validation queries (lowest AP, the rule of the worst-query grids), the query's map explains its
similarity to its top-1 retrieved image, each retrieved image's map explains its similarity to the query
(metriclab.inference.gradcam). Similarity = cosine similarity or minus the squared euclidean distance, following
`evaluation.distance`. The overlays are saved as one grid (`<run dir>/gradcam/gradcam_worst_queries.png` + a CSV
of what each tile is) and logged to the job's own MLflow run, tagged `explained_run_id` when `run=` was given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import pandas as pd
import torch
from omegaconf import DictConfig, open_dict

from metriclab.core.atomic import write_csv_atomic
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import ValidationData, build_validation_data, read_dataset_csv
from metriclab.evaluation.pictures import select_worst_queries
from metriclab.evaluation.validation import evaluate_validation
from metriclab.inference.embed import embed_all
from metriclab.inference.gradcam_grid import GridRows, QueryExplainer, draw_gradcam_grid
from metriclab.inference.model import load_extractor
from metriclab.jobs.runs import resolve_run
from metriclab.tracking.run import tracked_run

GRID_NAME = "gradcam_worst_queries"


def _checked(cfg: DictConfig, overrides) -> Tuple[DictConfig, int, int]:
    """The config with the explained run filled in, exact ranking and enough neighbours kept for the grid."""
    cfg = resolve_run(cfg, overrides)
    n_queries, top_k = int(cfg.n_queries), int(cfg.top_k)
    if n_queries < 1 or top_k < 1:
        raise ConfigError(f"`n_queries` and `top_k` must be >= 1, got {n_queries} and {top_k}")
    if cfg.get("ckpt") and not Path(cfg.ckpt).is_file():
        raise ConfigError(f"checkpoint {cfg.ckpt} does not exist: pass ckpt=<best.ckpt or last.ckpt of a training run>")
    with open_dict(cfg):  # exact ranking (AP needs it), and enough neighbours kept for the grid
        cfg.evaluation.backend = "exact"
        cfg.evaluation.grid_top_k = max(int(cfg.evaluation.grid_top_k), top_k)
    return cfg, n_queries, top_k


def _validation_data(cfg: DictConfig) -> Tuple[ValidationData, Any]:
    dataset = build(cfg.dataset, "dataset")
    root = Path(dataset.root)
    transform = build(cfg.transforms.val, "transforms.val")
    df = read_dataset_csv(root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
    return build_validation_data(df, root, transform, dataset.cache_size,
                                 on_bad_image=dataset.on_bad_image), transform


def explain(cfg: DictConfig) -> Dict[str, Any]:
    """GradCAM grid of the worst queries; returns run dir, files, the maps and the tracker run id."""
    run_dir, run_name, overrides = job_identity(cfg)
    cfg, n_queries, top_k = _checked(cfg, overrides)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    evaluation = build(cfg.evaluation, "evaluation")
    val_data, transform = _validation_data(cfg)  # a missing folder, CSV or image: no run opened
    distance = evaluation.distance

    with tracked_run(cfg, run_dir, run_name, overrides) as tracked:
        if cfg.get("run") and tracked.mlflow_client is not None:
            tracked.mlflow_client.set_tag(tracked.mlflow_run_id, "explained_run_id", str(cfg.run))
        extractor = load_extractor(cfg)
        emb = embed_all(extractor.model, val_data.dataset, [str(val_data.root / p) for p in val_data.paths],
                        "validation", int(cfg.batch_size), int(cfg.num_workers), extractor.precision,
                        flip_tta=evaluation.flip_tta)
        embeddings = torch.from_numpy(emb)
        report = evaluate_validation(embeddings, val_data, evaluation)
        worst = select_worst_queries(report, n_queries)
        if worst.empty:
            raise ConfigError("no validation query has a true match in the gallery: nothing to explain")
        explainer = QueryExplainer(extractor.model, val_data, embeddings, report, transform, distance, top_k,
                                   cfg.get("target_layer"))
        rows = GridRows()
        for _, query in worst.iterrows():
            explainer.add(rows, query)

        png, csv = run_dir / "gradcam" / f"{GRID_NAME}.png", run_dir / "gradcam" / f"{GRID_NAME}.csv"
        source = f"run {cfg.run}" if cfg.get("run") else f"ckpt {cfg.ckpt}"
        draw_gradcam_grid(rows.tiles, png, f"GradCAM ({distance} similarity) of the {len(rows.tiles)} worst queries "
                                           f"by AP, {source}. Query: map of its similarity to #1; #k: map of its "
                                           f"similarity to the query. Green = same label, red = different")
        write_csv_atomic(pd.DataFrame(rows.table), csv)
        tracked.log_artifact(png, "gradcam")
        tracked.log_artifact(csv, "gradcam")
        print(f"\n{run_name}: GradCAM of {len(rows.tiles)} worst queries x {top_k} retrieved -> {png}")
        return {"run_dir": run_dir, "png": png, "csv": csv, "maps": rows.maps, "worst": worst,
                "mlflow_run_id": tracked.mlflow_run_id, "ckpt": cfg.get("ckpt")}


__all__ = ["explain"]
