"""`train(cfg)`: the whole experiment from a composed config, tracked as one run."""
from __future__ import annotations

import logging
import shutil
import zipfile
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only
from torch.utils.data import DataLoader

from metriclab.core.atomic import atomic_write
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import build_train_data, build_validation_data, read_dataset_csv
from metriclab.evaluation.pictures import format_metrics_table
from metriclab.models.extractors import build_extractor, extractor_constructor_cfg, load_checkpoint
from metriclab.models.freezing import FreezeBackbone, freeze_batchnorm, set_trainable
from metriclab.models.losses import criterion_needs_balanced_batches
from metriclab.training.module import MetricLearningModule
from metriclab.tracking.run import tracked_run

log = logging.getLogger(__name__)


def expected_metric_keys(eval_cfg: DictConfig) -> List[str]:
    keys = ["mAP", "mINP"]
    keys += [f"cmc@{k}" for k in eval_cfg.cmc_top_k] + [f"map@{k}" for k in eval_cfg.map_top_k]
    keys += [f"precision@{k}" for k in eval_cfg.precision_top_k] + [f"knn_accuracy@{k}" for k in eval_cfg.knn_top_k]
    return keys


def resolve_resume(cfg: DictConfig) -> Tuple[Optional[Path], Optional[str]]:
    """`resume=<run dir>` or `ckpt_path=<file>` -> (checkpoint, MLflow run id stored in it)."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        ckpt_path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not ckpt_path.is_file():
            raise ConfigError(f"resume={cfg.resume}: {ckpt_path} does not exist (a run keeps last.ckpt after its "
                              f"first epoch); pass the run directory of a training run")
    if not ckpt_path:
        return None, None
    # only the run id is needed here (Lightning loads the weights itself): map the tensors rather than read them;
    # torch can map only zip-format files, so a legacy one is still read as before
    ckpt = load_checkpoint(ckpt_path, mmap=zipfile.is_zipfile(ckpt_path))
    return Path(ckpt_path), (ckpt.get("metriclab") or {}).get("mlflow_run_id")


def apply_freezing(extractor: torch.nn.Module, node: DictConfig) -> None:
    """`extractor.trainable=[...]` (only those sub-modules train) and `extractor.freeze_bn=true`."""
    if node.get("trainable") is not None:
        try:
            set_trainable(extractor, list(node.trainable))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"`extractor.trainable={list(node.trainable)}`: {e}") from e
    if node.get("freeze_bn"):
        freeze_batchnorm(extractor)


def build_loaders(cfg: DictConfig, train_data, val_data) -> Tuple[DataLoader, DataLoader]:
    sampler = None
    if cfg.get("sampler") is not None:
        sampler = build(cfg.sampler, "sampler", labels=train_data.labels.tolist(),
                        label2category=train_data.label2category)
    if sampler is not None:
        train_loader = DataLoader(train_data.dataset, batch_sampler=sampler, num_workers=cfg.num_workers)
    else:  # plain shuffled batches (classification losses do not need n x k batches)
        train_loader = DataLoader(train_data.dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True,
                                  num_workers=cfg.num_workers)
    if len(train_loader) == 0:
        raise ConfigError(f"the train loader yields no batch: {len(train_data.dataset)} train images are too few "
                          f"for the sampler/batch size; lower `sampler.n_labels`/`sampler.n_instances`/`batch_size`")
    val_loader = DataLoader(val_data.dataset, batch_size=cfg.batch_size_val, shuffle=False,
                            num_workers=cfg.num_workers)
    return train_loader, val_loader


def _existing(path: Path) -> Optional[str]:
    return str(path) if path.is_file() else None


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, validating every `trainer.check_val_every_n_epoch` epochs and after the last one; returns the run dir,
    checkpoints, the last metrics and the tracker run id."""
    run_dir, run_name, overrides = job_identity(cfg)
    if cfg.get("resume"):
        run_dir = Path(cfg.resume)  # a resumed run keeps writing where it started
    if cfg.metric_for_checkpointing not in expected_metric_keys(cfg.evaluation):
        raise ConfigError(f"metric_for_checkpointing={cfg.metric_for_checkpointing} is not computed; choose one of "
                          f"{expected_metric_keys(cfg.evaluation)}")
    ckpt_path, resume_run_id = resolve_resume(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    is_main = rank_zero_only.rank == 0  # DDP children re-run this script: only rank 0 opens a run
    with tracked_run(cfg, run_dir, run_name, overrides, resume_run_id, is_main_process=is_main) as tracked:
        df = read_dataset_csv(cfg.dataset.root, cfg.dataset.csv)
        root = Path(cfg.dataset.root)
        train_tf = build(cfg.transforms.train, "transforms.train")
        val_tf = build(cfg.transforms.val, "transforms.val")
        train_data = build_train_data(df, root, train_tf, cfg.dataset.cache_size)
        val_data = build_validation_data(df, root, val_tf, cfg.dataset.cache_size)
        log.info("train: %d images, %d classes; validation: %d queries, %d gallery", len(train_data.dataset),
                 train_data.n_classes, int(val_data.is_query.sum()), int(val_data.is_gallery.sum()))

        extractor = build_extractor(cfg.extractor)
        apply_freezing(extractor, cfg.extractor)
        emb_size = int(extractor.feat_dim)
        criterion = build(cfg.criterion, "criterion", num_classes=train_data.n_classes, embedding_size=emb_size,
                          in_features=emb_size, label2category=train_data.label2category)
        if cfg.get("sampler") is None and criterion_needs_balanced_batches(criterion):
            raise ConfigError(f"criterion {cfg.criterion._target_} mines triplets inside a batch and needs n x k "
                              f"batches: use sampler=balance or sampler=category_balance (not ~sampler)")
        train_loader, val_loader = build_loaders(cfg, train_data, val_data)
        optimizer_factory = build(cfg.optimizer, "optimizer")
        scheduler_factory = build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None

        module = MetricLearningModule(
            extractor, criterion, optimizer_factory, val_data, cfg.evaluation,
            scheduler_factory=scheduler_factory, tracked=tracked if is_main else None,
            run_dir=run_dir if is_main else None,
            checkpoint_extra={"extractor_cfg": OmegaConf.to_container(extractor_constructor_cfg(cfg.extractor)),
                              "run_dir": str(run_dir)},
            train_loader=train_loader, val_loader=val_loader, head=cfg.get("head"),
            group_lrs={"backbone": cfg.get("lr_backbone"), "head": cfg.get("lr_head"),
                       "criterion": cfg.get("lr_criterion")},
            channels_last=bool(cfg.get("channels_last")),
        )
        checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="best",
                                     monitor=f"val/{cfg.metric_for_checkpointing}", mode=cfg.mode_for_checkpointing,
                                     save_top_k=1, auto_insert_metric_name=False)
        # last.ckpt after every epoch, validated or not (check_val_every_n_epoch > 1): what `resume=` continues from
        last = ModelCheckpoint(dirpath=run_dir / "checkpoints", save_top_k=0, save_last=True,
                               save_on_train_epoch_end=True)
        callbacks = [checkpoint, last]
        if cfg.get("freeze_n_epochs"):
            callbacks.append(FreezeBackbone(int(cfg.freeze_n_epochs), head=cfg.get("head")))
        trainer: pl.Trainer = build(cfg.trainer, "trainer", logger=tracked.loggers or False,
                                    callbacks=callbacks, default_root_dir=str(run_dir))
        init_metrics = None
        if cfg.get("validate_before_training") and ckpt_path is None:
            module.val_tag = "init"  # the untrained model's numbers, for the before/after comparison
            trainer.validate(module, verbose=False)
            init_metrics, module.val_tag = module.last_metrics, None
        trainer.fit(module, ckpt_path=str(ckpt_path) if ckpt_path else None)
        last_epoch = trainer.current_epoch - 1
        if last_epoch >= 0 and module.last_validated_epoch != last_epoch and not trainer.interrupted:
            # check_val_every_n_epoch skipped the last epoch: the final model always gets its numbers
            module.val_epoch_offset = -1  # after fit, Lightning's epoch counter is one past the last epoch
            trainer.validate(module, verbose=False)
            module.val_epoch_offset = 0
            score, best = module.last_metrics.get(cfg.metric_for_checkpointing), checkpoint.best_model_score
            better = best is None or (score > best if cfg.mode_for_checkpointing == "max" else score < best)
            if better and trainer.is_global_zero and last.last_model_path:  # the final model is the best seen
                # atomically: a crash mid-copy must not leave a truncated best.ckpt that later code trusts
                atomic_write(run_dir / "checkpoints" / "best.ckpt",
                             lambda tmp: shutil.copyfile(last.last_model_path, tmp), suffix=".ckpt")

        metrics = module.last_metrics
        if trainer.is_global_zero and metrics:
            print(f"\nvalidation after epoch {trainer.current_epoch - 1} ({run_name}):\n"
                  f"{format_metrics_table(metrics)}\nrun dir: {run_dir}")
            tracked.log_artifact(run_dir / "metrics.json")
        return {
            "run_dir": run_dir,
            "best_ckpt": checkpoint.best_model_path or _existing(run_dir / "checkpoints" / "best.ckpt"),
            "last_ckpt": last.last_model_path or None,
            "metrics": metrics,
            "init_metrics": init_metrics,
            "mlflow_run_id": tracked.mlflow_run_id,
            "run_name": run_name,
        }
