"""`validate(cfg)`: metrics of a checkpoint (or random/zoo weights) on the validation rows, one tracked run."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from metriclab.config import ConfigError, build
from metriclab.data import build_validation_data, read_dataset_csv
from metriclab.evaluation import format_metrics_table
from metriclab.extractors import build_extractor, load_extractor_weights
from metriclab.module import MetricLearningModule
from metriclab.tracking import tracked_run
from metriclab.train import job_identity


def validate(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate `cfg.ckpt` (our training checkpoint or an extractor state dict; none = the extractor's own
    weights, i.e. a zoo key or random init) on query/gallery. Returns run dir, metrics and run id."""
    run_dir, run_name, overrides = job_identity(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    with tracked_run(cfg, run_dir, run_name, overrides) as tracked:
        df = read_dataset_csv(cfg.dataset.root, cfg.dataset.csv)
        val_data = build_validation_data(df, Path(cfg.dataset.root), build(cfg.transforms.val, "transforms.val"),
                                         cfg.dataset.cache_size)
        extractor_cfg = cfg.extractor
        epoch = 0
        if cfg.get("ckpt"):
            from metriclab.extractors import load_checkpoint

            meta = load_checkpoint(cfg.ckpt).get("metriclab") or {}
            if meta.get("extractor_cfg") and cfg.get("extractor_from_ckpt", True):
                # the checkpoint knows its architecture; weights come from the checkpoint, not the zoo
                extractor_cfg = OmegaConf.create({**meta["extractor_cfg"], "weights": None})
            extractor = build_extractor(extractor_cfg)
            ckpt = load_extractor_weights(extractor, cfg.ckpt)
            epoch = int(ckpt.get("epoch", 0))
        else:
            extractor = build_extractor(extractor_cfg)
        module = MetricLearningModule(extractor, torch.nn.Identity(), None, val_data, cfg.evaluation,
                                      tracked=tracked, run_dir=run_dir)
        module.val_epoch_offset = epoch
        loader = DataLoader(val_data.dataset, batch_size=cfg.batch_size_val, shuffle=False,
                            num_workers=cfg.num_workers)
        trainer: pl.Trainer = build(cfg.trainer, "trainer", logger=tracked.loggers or False, callbacks=[],
                                    default_root_dir=str(run_dir))
        trainer.validate(module, loader, verbose=False)
        metrics = module.last_metrics
        if not metrics:
            raise ConfigError("validation produced no metrics")
        if trainer.is_global_zero:
            source = f"ckpt {cfg.ckpt}" if cfg.get("ckpt") else f"weights {extractor_cfg.get('weights')}"
            print(f"\n{run_name} on {cfg.dataset.root} ({source}):\n{format_metrics_table(metrics)}\nrun dir: {run_dir}")
            tracked.log_artifact(run_dir / "metrics.json")
        return {"run_dir": run_dir, "metrics": metrics, "mlflow_run_id": tracked.mlflow_run_id, "run_name": run_name}
