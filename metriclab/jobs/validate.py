"""`validate(cfg)`: metrics of a model on the validation rows (query vs gallery), one tracked run.

What is evaluated, in order of precedence:
- `embeddings=<file.npz>`: precomputed embeddings (`embeddings` float32 N x D, `paths` = the CSV's validation rows);
- `ckpt=<file>`: one of our training checkpoints (its extractor architecture is stored in it) or an extractor
  state dict for the configured `extractor`;
- neither: the configured `extractor` with its own weights (a zoo key, a local path, or null = random init).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from metriclab.core.atomic import atomic_write
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import ValidationData, build_validation_data, read_dataset_csv
from metriclab.evaluation.pictures import evaluate_validation, format_metrics_table
from metriclab.training.publish import publish_validation
from metriclab.models.extractors import build_extractor_for_inference
from metriclab.training.module import MetricLearningModule
from metriclab.tracking.run import tracked_run


def load_embeddings_npz(path: str | Path, data: ValidationData) -> torch.Tensor:
    """Embeddings from an .npz, reordered to the validation rows; every row must be there exactly once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"embeddings={path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConfigError(f"embeddings={path} is not a readable .npz file: {e}") from e
    for key in ("embeddings", "paths"):
        if key not in npz.files:
            raise ConfigError(f"{path}: missing array `{key}` (found {npz.files}); expected `embeddings` (N x D "
                              f"float32) and `paths` (the CSV's validation paths), as written by export_embeddings=true")
    emb, paths = npz["embeddings"], npz["paths"].astype(str)
    if emb.ndim != 2 or len(emb) != len(paths):
        raise ConfigError(f"{path}: `embeddings` must be N x D with N = len(paths) = {len(paths)}, got {emb.shape}")
    if not np.isfinite(emb).all():
        raise ConfigError(f"{path}: `embeddings` contains NaN or inf")
    position = {p: i for i, p in enumerate(paths)}
    if len(position) != len(paths):
        raise ConfigError(f"{path}: `paths` has duplicates")
    missing = [p for p in data.paths if p not in position]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} validation rows of the CSV have no embedding, e.g. {missing[:3]}")
    return torch.from_numpy(emb[[position[p] for p in data.paths]].astype(np.float32))


def save_embeddings_npz(path: Path, embeddings: torch.Tensor, data: ValidationData) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, embeddings=embeddings.numpy().astype(np.float32),
                                            paths=data.paths.astype(str), labels=data.labels), ".npz")


def validate(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate and log; returns run dir, metrics and tracker run id (on every DDP rank the same metrics)."""
    run_dir, run_name, overrides = job_identity(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    is_main = rank_zero_only.rank == 0  # DDP children re-run this script: only rank 0 opens a run
    with tracked_run(cfg, run_dir, run_name, overrides, is_main_process=is_main) as tracked:
        df = read_dataset_csv(cfg.dataset.root, cfg.dataset.csv)
        val_data = build_validation_data(df, Path(cfg.dataset.root), build(cfg.transforms.val, "transforms.val"),
                                         cfg.dataset.cache_size)
        embeddings: Optional[torch.Tensor] = None
        if cfg.get("embeddings"):
            embeddings = load_embeddings_npz(cfg.embeddings, val_data)
            report = evaluate_validation(embeddings, val_data, cfg.evaluation)
            publish_validation(report, embeddings, val_data, cfg.evaluation, tracked, run_dir, epoch=0)
            metrics, source = {k: float(v) for k, v in report.metrics.items()}, f"embeddings {cfg.embeddings}"
        else:
            extractor, ckpt, built = build_extractor_for_inference(cfg.extractor, cfg.get("ckpt"),
                                                                   cfg.get("extractor_from_ckpt", True))
            epoch = int(ckpt.get("epoch", 0))
            source = f"ckpt {cfg.ckpt}" if cfg.get("ckpt") else f"weights {built.get('weights')}"
            loader = DataLoader(val_data.dataset, batch_size=cfg.batch_size_val, shuffle=False,
                                num_workers=cfg.num_workers)
            # the module hands the loader to Lightning, split across ranks under DDP
            module = MetricLearningModule(extractor, torch.nn.Identity(), None, val_data, cfg.evaluation,
                                          tracked=tracked if is_main else None, run_dir=run_dir if is_main else None,
                                          val_loader=loader)
            module.val_epoch_offset = epoch
            trainer: pl.Trainer = build(cfg.trainer, "trainer", logger=tracked.loggers or False, callbacks=[],
                                        default_root_dir=str(run_dir))
            trainer.validate(module, verbose=False)
            metrics, embeddings = module.last_metrics, module.last_embeddings
        if is_main:
            if cfg.get("export_embeddings"):
                save_embeddings_npz(run_dir / "embeddings.npz", embeddings, val_data)
            print(f"\n{run_name} on {cfg.dataset.root} ({source}):\n{format_metrics_table(metrics)}\n"
                  f"run dir: {run_dir}")
            tracked.log_artifact(run_dir / "metrics.json")
        return {"run_dir": run_dir, "metrics": metrics, "mlflow_run_id": tracked.mlflow_run_id, "run_name": run_name,
                "embeddings": embeddings}
