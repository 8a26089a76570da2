"""`train(cfg)`: the whole experiment from a composed config, tracked as one run.

What can be checked without a run (the checkpoint metric, the resume checkpoint, the dataset CSV) is checked before
the MLflow run opens, so such a mistake leaves no run behind; the rest fails inside the run, which ends FAILED.
"""
from __future__ import annotations

import logging
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, cast

import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities import rank_zero_only

from metriclab.core.checkpoint import CheckpointMeta, previous_path
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.core.extra_validation import extra_validation_roots
from metriclab.core.schemas import DatasetConfig, EvaluationConfig
from metriclab.data.datamodule import MetricLearningDataModule
from metriclab.data.datasets import ValidationData, build_train_data, build_validation_data, read_dataset_csv
from metriclab.data.extra_validation import read_extra_validation
from metriclab.evaluation.pictures import format_metrics_table
from metriclab.evaluation.postprocess import PostprocessStep, check_sizes, steps_from_config
from metriclab.evaluation.report import PLAIN_PREFIX
from metriclab.models.extractors import build_extractor, extractor_constructor_cfg, load_checkpoint
from metriclab.models.freezing import freeze_batchnorm, set_trainable
from metriclab.models.losses import criterion_needs_balanced_batches
from metriclab.tracking.debug import as_debug_run
from metriclab.tracking.links import tracked_run_link
from metriclab.tracking.run import TrackedRun, tracked_run
from metriclab.tracking.study import study_trial
from metriclab.training.callbacks import (
    CheckpointMetadata,
    FreezeBackbone,
    PublishValidation,
    RaiseSwallowedInterrupt,
    TrainingMetrics,
    ValidateEveryRow,
    ValidateLastEpoch,
)
from metriclab.training.checkpoint_io import AtomicCheckpointIO, load_with_fallback
from metriclab.training.module import MetricLearningModule

log = logging.getLogger(__name__)


def expected_metric_keys(eval_cfg: Any, postprocess: Sequence[Any] = (), extra: Sequence[str] = ()) -> List[str]:
    """The metrics `metric_for_checkpointing` may name; with post-processing, the plain ranking's too; with extra
    validation sets, theirs as `<name>/<metric>`."""
    keys = ["mAP", "mINP", "map@r", "r_precision"]
    keys += [f"cmc@{k}" for k in eval_cfg.cmc_top_k] + [f"map@{k}" for k in eval_cfg.map_top_k]
    keys += [f"precision@{k}" for k in eval_cfg.precision_top_k] + [f"knn_accuracy@{k}" for k in eval_cfg.knn_top_k]
    keys = keys + ([PLAIN_PREFIX + k for k in keys] if postprocess else [])
    return keys + [f"{name}/{k}" for name in extra for k in keys]


def resolve_resume(cfg: DictConfig) -> Tuple[Optional[Path], Optional[str]]:
    """`resume=<run dir>` or `ckpt_path=<file>` -> (checkpoint, MLflow run id stored in it)."""
    ckpt_path = cfg.get("ckpt_path")
    if cfg.get("resume"):
        ckpt_path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not ckpt_path.is_file() and not previous_path(ckpt_path).is_file():
            raise ConfigError(f"resume={cfg.resume}: {ckpt_path} does not exist (a run keeps last.ckpt after its "
                              f"first epoch); pass the run directory of a training run")
    if not ckpt_path:
        return None, None
    # only the run id is needed here (Lightning loads the weights itself): map the tensors rather than read them;
    # torch can map only zip-format files, so a legacy one is still read as before. A checkpoint that does not load
    # (a write killed before checkpoints were written atomically) falls back to the one it replaced
    path, ckpt = load_with_fallback(ckpt_path, lambda p: load_checkpoint(p, mmap=zipfile.is_zipfile(p)))
    return path, CheckpointMeta.from_checkpoint(ckpt).mlflow_run_id


def apply_freezing(extractor: torch.nn.Module, node: DictConfig) -> None:
    """`extractor.trainable=[...]` (only those sub-modules train) and `extractor.freeze_bn=true`."""
    if node.get("trainable") is not None:
        try:
            set_trainable(extractor, list(node.trainable))
        except (KeyError, ValueError) as e:
            raise ConfigError(f"`extractor.trainable={list(node.trainable)}`: {e}") from e
    if node.get("freeze_bn"):
        freeze_batchnorm(extractor)


@dataclass
class Checked:
    """What `check_inputs` read and checked before any run exists."""

    run_dir: Path
    run_name: str
    overrides: List[str]
    ckpt_path: Optional[Path]  # the checkpoint training resumes from
    resume_run_id: Optional[str]  # the MLflow run it continues
    dataset: DatasetConfig
    df: pd.DataFrame
    evaluation: EvaluationConfig
    postprocess: Tuple[PostprocessStep, ...] = ()
    extra_val: Dict[str, ValidationData] = field(default_factory=dict)  # cross-dataset validation sets


def check_inputs(cfg: DictConfig) -> Checked:
    """The checks that need no run: the checkpoint metric is computed, the resume checkpoint and the dataset CSV
    are there and readable."""
    run_dir, run_name, overrides = job_identity(cfg)
    if cfg.get("resume"):
        run_dir = Path(cfg.resume)  # a resumed run keeps writing where it started
    evaluation = build(cfg.evaluation, "evaluation")
    postprocess = steps_from_config(cfg.get("postprocess"))
    extra_names = list(extra_validation_roots(cfg.get("extra_validation")))
    if cfg.metric_for_checkpointing not in expected_metric_keys(evaluation, postprocess, extra_names):
        raise ConfigError(f"metric_for_checkpointing={cfg.metric_for_checkpointing} is not computed; choose one of "
                          f"{expected_metric_keys(evaluation, postprocess, extra_names)}")
    ckpt_path, resume_run_id = resolve_resume(cfg)
    dataset = build(cfg.dataset, "dataset")
    df = read_dataset_csv(dataset.root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
    extra_val = read_extra_validation(cfg.get("extra_validation"), build(cfg.transforms.val, "transforms.val"))
    for data in extra_val.values():
        check_sizes(postprocess, int(data.is_query.sum()), int(data.is_gallery.sum()))
    return Checked(run_dir, run_name, overrides, ckpt_path, resume_run_id, dataset, df, evaluation, postprocess,
                   extra_val)


def build_datamodule_and_module(cfg: DictConfig, checked: Checked) -> Tuple[MetricLearningDataModule,
                                                                             MetricLearningModule]:
    """Data, extractor (with its freezing), criterion, loaders and the module, in the order that fixes the seeded
    random initialisation (changing it changes every trained number)."""
    root = Path(checked.dataset.root)
    train_data = build_train_data(checked.df, root, build(cfg.transforms.train, "transforms.train"),
                                  checked.dataset.cache_size, on_bad_image=checked.dataset.on_bad_image)
    val_data = build_validation_data(checked.df, root, build(cfg.transforms.val, "transforms.val"),
                                     checked.dataset.cache_size, on_bad_image=checked.dataset.on_bad_image)
    log.info("train: %d images, %d classes; validation: %d queries, %d gallery", len(train_data.dataset),
             train_data.n_classes, int(val_data.is_query.sum()), int(val_data.is_gallery.sum()))
    extractor = build_extractor(cfg.extractor)
    apply_freezing(extractor, cfg.extractor)
    emb_size = int(cast(Any, extractor).feat_dim)  # OML extractors' embedding size
    criterion = build(cfg.criterion, "criterion", num_classes=train_data.n_classes, embedding_size=emb_size,
                      in_features=emb_size, label2category=train_data.label2category)
    if cfg.get("sampler") is None and criterion_needs_balanced_batches(criterion):
        raise ConfigError(f"criterion {cfg.criterion._target_} mines triplets inside a batch and needs n x k "
                          f"batches: use sampler=balance or sampler=category_balance (not ~sampler)")
    datamodule = MetricLearningDataModule(train_data, val_data, cfg.get("sampler"), batch_size=cfg.batch_size,
                                          batch_size_val=cfg.batch_size_val, num_workers=cfg.num_workers,
                                          extra_val=checked.extra_val)
    module = MetricLearningModule(
        extractor, criterion, build(cfg.optimizer, "optimizer"),
        scheduler_factory=build(cfg.scheduler, "scheduler") if cfg.get("scheduler") else None,
        head=cfg.get("head"),
        group_lrs={"backbone": cfg.get("lr_backbone"), "head": cfg.get("lr_head"),
                   "criterion": cfg.get("lr_criterion")},
        channels_last=bool(cfg.get("channels_last")),
        flip_tta=checked.evaluation.flip_tta,
    )
    return datamodule, module


@dataclass
class Loop:
    """The trainer and the callbacks whose results train() reads."""

    trainer: pl.Trainer
    best: ModelCheckpoint
    last: ModelCheckpoint
    publisher: PublishValidation


def build_loop(cfg: DictConfig, checked: Checked, tracked: TrackedRun, val_data: Any, is_main: bool) -> Loop:
    ckpt_dir = checked.run_dir / "checkpoints"
    best = ModelCheckpoint(dirpath=ckpt_dir, filename="best", monitor=f"val/{cfg.metric_for_checkpointing}",
                           mode=cfg.mode_for_checkpointing, save_top_k=1, auto_insert_metric_name=False)
    # last.ckpt after every epoch, validated or not (check_val_every_n_epoch > 1): what `resume=` continues from
    last = ModelCheckpoint(dirpath=ckpt_dir, save_top_k=0, save_last=True, save_on_train_epoch_end=True)
    # DDP: only rank 0 logs and writes files
    target_fmr = build(cfg.get("calibration"), "calibration").target_fmr
    publisher = PublishValidation(val_data, checked.evaluation, tracked=tracked if is_main else None,
                                  run_dir=checked.run_dir if is_main else None, postprocess=checked.postprocess,
                                  extra_val=checked.extra_val, target_fmr=target_fmr)
    extractor_cfg = cast(Dict[str, Any], OmegaConf.to_container(extractor_constructor_cfg(cfg.extractor)))
    meta = CheckpointMeta(extractor_cfg=extractor_cfg,
                          run_dir=str(checked.run_dir), mlflow_run_id=tracked.mlflow_run_id if is_main else None)
    callbacks = [best, last, TrainingMetrics(tracked if is_main else None), publisher, ValidateLastEpoch(),
                 ValidateEveryRow(), RaiseSwallowedInterrupt(),
                 CheckpointMetadata(meta, publisher, target_fmr, checked.evaluation.distance)]
    if cfg.get("freeze_n_epochs"):
        callbacks.append(FreezeBackbone(int(cfg.freeze_n_epochs), head=cfg.get("head")))
    # checkpoints written beside their final name and renamed, never half-written (see AtomicCheckpointIO)
    trainer = build(cfg.trainer, "trainer", logger=tracked.loggers or False, callbacks=callbacks,
                    default_root_dir=str(checked.run_dir), plugins=[AtomicCheckpointIO()])
    if trainer.fast_dev_run:  # keeps no checkpoint; Lightning 2.5 still writes save_last's last.ckpt at the end
        last.save_last = False
    return Loop(trainer, best, last, publisher)


def fit(cfg: DictConfig, checked: Checked, loop: Loop, module: MetricLearningModule,
        datamodule: MetricLearningDataModule) -> Optional[Dict[str, float]]:
    """The pass before training (when asked), training, and the last epoch's pass if `fit` did not validate it;
    returns the pass before training's metrics (None without one)."""
    trainer, publisher = loop.trainer, loop.publisher
    init_metrics = None
    if cfg.get("validate_before_training") and checked.ckpt_path is None:
        with publisher.publishing_as(epoch=0, tag="init"):  # the untrained model, for the before/after comparison
            trainer.validate(module, datamodule=datamodule, verbose=False)
        init_metrics = publisher.metrics
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(checked.ckpt_path) if checked.ckpt_path else None)
    last_epoch = trainer.current_epoch - 1  # after fit, Lightning's epoch counter is one past the last epoch
    if last_epoch >= 0 and publisher.validated_epoch != last_epoch and not trainer.interrupted:
        # fit validated the last epoch unless it ended early (max_steps) or had nothing left to train (a resumed
        # finished run): the final model always gets its numbers
        with publisher.publishing_as(epoch=last_epoch):
            trainer.validate(module, datamodule=datamodule, verbose=False)
    return init_metrics


def best_value(loop: Loop, metric: str) -> float:
    """The run's best `metric_for_checkpointing` (best.ckpt's score; the last validation's when no checkpoint was
    chosen): the objective of a study's trial. NaN when there is none."""
    score = loop.best.best_model_score
    value = float(score) if score is not None else float(loop.publisher.metrics.get(metric, math.nan))
    if not math.isfinite(value) and study_trial() is not None:  # inside the run: it ends FAILED, like the trial
        raise ValueError(f"the trial has no finite {metric} (got {value}): it cannot be the study's objective")
    return value


def _existing(path: Path) -> Optional[str]:
    return str(path) if path.is_file() else None


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, validating every `trainer.check_val_every_n_epoch` epochs and after the last one; returns the run dir,
    checkpoints, the last metrics, the best `metric_for_checkpointing` (`objective`) and the tracker run id."""
    checked = check_inputs(cfg)
    cfg, checked.run_name = as_debug_run(cfg, checked.run_name)  # debug=<name>: its own experiment, named debug-...
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    pl.seed_everything(cfg.seed, workers=True, verbose=False)

    run_dir, run_name = checked.run_dir, checked.run_name
    is_main = getattr(rank_zero_only, "rank", 0) == 0  # DDP children re-run this script: only rank 0 opens a run
    with tracked_run(cfg, run_dir, run_name, checked.overrides, checked.resume_run_id,
                     is_main_process=is_main) as tracked:
        datamodule, module = build_datamodule_and_module(cfg, checked)
        loop = build_loop(cfg, checked, tracked, datamodule.val_data, is_main)
        init_metrics = fit(cfg, checked, loop, module, datamodule)
        metrics = loop.publisher.metrics
        objective = best_value(loop, str(cfg.metric_for_checkpointing))
        if loop.trainer.is_global_zero and metrics:
            link = tracked_run_link(tracked)
            print(f"\nvalidation after epoch {loop.trainer.current_epoch - 1} ({run_name}):\n"
                  f"{format_metrics_table(metrics)}\nrun dir: {run_dir}" + (f"\nMLflow run: {link}" if link else ""))
            tracked.log_artifact(run_dir / "metrics.json")
        return {
            "run_dir": run_dir,
            "best_ckpt": loop.best.best_model_path or _existing(run_dir / "checkpoints" / "best.ckpt"),
            "last_ckpt": loop.last.last_model_path or None,
            "metrics": metrics,
            "init_metrics": init_metrics,
            "objective": objective,
            "mlflow_run_id": tracked.mlflow_run_id,
            "run_name": run_name,
            "global_step": loop.trainer.global_step,  # optimizer steps taken (this fit; a resumed run counts on)
            # the width of the last validation's embeddings (None before any validation)
            "embedding_size": None if loop.publisher.embeddings is None else int(loop.publisher.embeddings.shape[1]),
        }
