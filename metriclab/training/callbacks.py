"""What a training run does around the model, as Lightning callbacks: the per-epoch training metrics, publishing
each validation pass, validating the last epoch, the checkpoint metadata and the backbone-freezing schedule.

The module (`metriclab.training.module`) computes; these log, write and decide when.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.strategies import DDPStrategy
from pytorch_lightning.trainer.states import TrainerFn
from torch import nn

from metriclab.core import interrupt
from metriclab.core.checkpoint import CHECKPOINT_META_KEY, CheckpointMeta
from metriclab.core.compat import ddp_finds_unused_parameters
from metriclab.data.datasets import ValidationData
from metriclab.data.extra_validation import prefixed
from metriclab.evaluation.validation import evaluate_validation
from metriclab.evaluation.verification import fmr_key
from metriclab.models.freezing import (
    freeze_backbone,
    keep_frozen_bn_in_eval,
    resolve_submodule_names,
    unfreeze_backbone,
)
from metriclab.training.module import TRAIN_LOGS_KEY, MetricLearningModule
from metriclab.training.publish import publish_validation

log = logging.getLogger(__name__)


class TrainingMetrics(pl.Callback):
    """Per epoch, on rank 0: the means of the batches' `train/loss` and `train/<criterion log>`, and the rate each
    optimizer group trained with (`lr/<group>`), logged through `tracked` with step = epoch.

    Logged once per epoch, before its validation and its checkpoints: a run resumed from last.ckpt then has no epoch
    missing (the tracker skips the steps it already has, so none is duplicated either)."""

    def __init__(self, tracked: Any = None):
        self.tracked = tracked
        self._sums: Dict[str, float] = defaultdict(float)
        self._batches = 0
        self._lrs: Dict[str, float] = {}
        self._flushed_epoch = -1

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._sums.clear()
        self._batches = 0
        # the rates this epoch trains with (an epoch-interval scheduler steps before the epoch's metrics are logged)
        self._lrs = {f"lr/{g.get('name', i)}": g["lr"] for i, g in enumerate(trainer.optimizers[0].param_groups)}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        logs = outputs.get(TRAIN_LOGS_KEY) if isinstance(outputs, dict) else None
        if logs:
            for k, v in logs.items():
                self._sums[k] += v
            self._batches += 1
        if trainer.is_last_batch:  # before the epoch-end checkpoint callbacks run
            self._flush(trainer)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            self._flush(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        if self._flushed_epoch == trainer.current_epoch or not self._batches:
            return
        self._flushed_epoch = trainer.current_epoch
        if self.tracked is None or not trainer.is_global_zero:
            return
        metrics = {k: v / self._batches for k, v in self._sums.items()}
        metrics.update(self._lrs)
        self.tracked.log_metrics(metrics, step=trainer.current_epoch)


class PublishValidation(pl.Callback):
    """Each validation pass: the module's gathered embeddings are evaluated; every rank logs `val/<metric>` through
    `pl_module.log_dict` (what ModelCheckpoint monitors, on any rank); rank 0 publishes (tracker metrics with step =
    epoch, metrics.json, worst-query grid, t-SNE) through `publish_validation`.

    A pass inside `fit` is named after its epoch; a pass run with `trainer.validate` inside `publishing_as(...)` is
    named as asked (the pass before training: tag "init"). `metrics` / `embeddings` are the last pass's."""

    def __init__(self, val_data: ValidationData, eval_cfg: Any, tracked: Any = None, run_dir: Optional[Path] = None,
                 postprocess: Sequence[Any] = (), extra_val: Optional[Dict[str, ValidationData]] = None,
                 target_fmr: Optional[float] = None):
        self.val_data, self.eval_cfg, self.postprocess = val_data, eval_cfg, tuple(postprocess)
        self.target_fmr = target_fmr  # the calibration's operating point (its threshold goes into checkpoints)
        self.extra_val = dict(extra_val or {})  # validation dataloaders 1, 2, ... (the datamodule's order)
        self.tracked, self.run_dir = tracked, run_dir
        self.metrics: Dict[str, float] = {}
        self.embeddings: Optional[torch.Tensor] = None
        #: the last epoch whose untagged pass was published (-1: none)
        self.validated_epoch = -1
        self._as: Optional[Tuple[int, Optional[str]]] = None

    @contextlib.contextmanager
    def publishing_as(self, epoch: int, tag: Optional[str] = None) -> Iterator[None]:
        """Passes run in this block are published as `epoch` (steps, `epoch_XXX` folders) with `tag` (metrics
        `<tag>/...`, files under `<tag>/`): for `trainer.validate` calls, whose epoch counter means nothing."""
        self._as = (int(epoch), tag)
        try:
            yield
        finally:
            self._as = None

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        module = cast(MetricLearningModule, pl_module)
        embeddings = module.validation_embeddings(len(self.val_data.df))
        report = evaluate_validation(embeddings, self.val_data, self.eval_cfg, self.postprocess, self.target_fmr)
        for i, (name, data) in enumerate(self.extra_val.items(), start=1):  # every rank, in order: a collective
            extra = evaluate_validation(module.validation_embeddings(len(data.df), i), data, self.eval_cfg,
                                        self.postprocess, self.target_fmr)
            report.metrics.update(prefixed(name, extra.metrics))
        metrics = {k: float(v) for k, v in report.metrics.items()}
        self.metrics, self.embeddings = metrics, embeddings
        # every rank logs the same values: checkpointing may monitor them on any rank
        pl_module.log_dict({f"val/{k}": v for k, v in metrics.items() if not math.isnan(v)}, logger=False)
        epoch, tag = self._as if self._as is not None else (trainer.current_epoch, None)
        if tag is None:
            self.validated_epoch = epoch
        if trainer.is_global_zero:
            publish_validation(report, embeddings, self.val_data, self.eval_cfg, self.tracked, self.run_dir,
                               epoch=epoch, tag=tag, target_fmr=self.target_fmr)


class ValidateLastEpoch(pl.Callback):
    """`check_val_every_n_epoch=N` validates every N-th epoch; the last one is validated too, inside `fit`, so
    ModelCheckpoint keeps best.ckpt over it like over any other validated epoch.

    Lightning decides per batch from the trainer's public `check_val_every_n_epoch`: it is 1 for the last epoch and
    put back when training ends (not at epoch end: ModelCheckpoint reads it then too). An epoch that ends early
    (`max_steps`) is not known to be the last: the job validates it after `fit` (see `validated_epoch`)."""

    def __init__(self) -> None:
        self._every: Optional[int] = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = trainer.check_val_every_n_epoch
        last = trainer.max_epochs is not None and trainer.current_epoch == trainer.max_epochs - 1
        if last and every is not None and every > 1:
            self._every = every
            trainer.check_val_every_n_epoch = 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._every is not None:
            trainer.check_val_every_n_epoch, self._every = self._every, None


class RaiseSwallowedInterrupt(pl.Callback):
    """A Ctrl-C whose KeyboardInterrupt Python dropped (raised inside a garbage-collection callback) is raised again
    at the next batch boundary (`metriclab.core.interrupt`), where Lightning turns it into a clean stop."""

    def on_train_batch_start(self, *args: Any) -> None:
        interrupt.raise_if_pending()

    def on_train_batch_end(self, *args: Any) -> None:
        interrupt.raise_if_pending()

    def on_validation_batch_end(self, *args: Any) -> None:
        interrupt.raise_if_pending()

    def on_train_epoch_end(self, *args: Any) -> None:
        interrupt.raise_if_pending()


class ValidateEveryRow(pl.Callback):
    """Validation metrics need every validation row (`PublishValidation` checks it got them): a retrieval metric over
    part of the queries and part of the gallery answers another question (a smaller gallery scores higher). So
    Lightning's debugging flags limit the training batches only: the validation cut that `fast_dev_run`,
    `overfit_batches` or a partial `limit_val_batches` ask for is lifted (said once in the log); `limit_val_batches=0`
    (no validation at all) stays. Validate less often with `check_val_every_n_epoch`."""

    @staticmethod
    def is_partial(limit: Any) -> bool:
        if isinstance(limit, bool):
            return False
        if isinstance(limit, int):  # a number of batches (fast_dev_run and an int overfit_batches set one)
            return limit > 0
        return 0.0 < float(limit) < 1.0  # a fraction (1.0: everything, 0.0: no validation)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        limit = trainer.limit_val_batches
        if self.is_partial(limit):
            log.info("validation embeds every validation row (its metrics need the whole set): limit_val_batches=%s "
                     "(from fast_dev_run / overfit_batches / limit_val_batches) limits nothing here", limit)
            trainer.limit_val_batches = 1.0


class CheckpointMetadata(pl.Callback):
    """Every checkpoint carries `meta` (the extractor's architecture, the run dir, the MLflow run id) under
    `CHECKPOINT_META_KEY`: enough to rebuild the extractor and to resume into the same tracker run. With
    `publisher` and `target_fmr`: also the calibrated threshold, `threshold@fmr_<target_fmr>` of the validation
    pass the checkpoint is saved after (best.ckpt: the best epoch's)."""

    def __init__(self, meta: CheckpointMeta, publisher: Optional[PublishValidation] = None,
                 target_fmr: Optional[float] = None, distance: Optional[str] = None):
        self.meta, self.publisher, self.target_fmr, self.distance = meta, publisher, target_fmr, distance

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: Dict[str, Any]) -> None:
        meta = self.meta
        if self.publisher is not None and self.target_fmr is not None:
            value = self.publisher.metrics.get(f"threshold@fmr_{fmr_key(self.target_fmr)}")
            if value is not None and math.isfinite(value):
                meta = replace(meta, threshold=float(value), threshold_fmr=float(self.target_fmr),
                               threshold_distance=self.distance)
        checkpoint[CHECKPOINT_META_KEY] = meta.to_dict()


class FreezeBackbone(pl.Callback):
    """Freeze the extractor except its `head` sub-modules for the first `n_epochs` epochs, then unfreeze.

    Parameters frozen here get ``requires_grad=False`` and BatchNorm layers outside the head are held in eval mode;
    at epoch ``n_epochs`` the previous state is restored exactly, so ``set_trainable`` and ``freeze_batchnorm``
    choices survive. The loss's parameters are not in the extractor and always train. Decided per epoch from
    ``trainer.current_epoch``, so a resumed run freezes (or not) correctly. The extractor is
    ``pl_module.<extractor_attr>``; by default the first of ``extractor`` / ``model`` that exists.

    The optimizer may be built before the first epoch with every then-trainable parameter: frozen ones get no
    gradient and are skipped. Under DDP this needs ``find_unused_parameters=True`` (checked in ``setup``).
    """

    def __init__(self, n_epochs: int, head: Optional[Sequence[str]] = None, extractor_attr: Optional[str] = None):
        if isinstance(n_epochs, bool) or int(n_epochs) != n_epochs or n_epochs < 0:
            raise ValueError(f"freeze_n_epochs must be an integer >= 0, got {n_epochs!r}")
        self.n_epochs = int(n_epochs)
        self.head = [head] if isinstance(head, str) else (list(head) if head is not None else [])
        self.extractor_attr = extractor_attr
        self._saved_requires_grad: Optional[Dict[str, bool]] = None

    @property
    def is_frozen(self) -> bool:
        return self._saved_requires_grad is not None

    def _extractor(self, pl_module: Any) -> nn.Module:
        attrs = [self.extractor_attr] if self.extractor_attr else ["extractor", "model"]
        for attr in attrs:
            candidate = getattr(pl_module, attr, None)
            if isinstance(candidate, nn.Module):
                return candidate
        raise AttributeError(f"FreezeBackbone: {type(pl_module).__name__} has no extractor attribute among {attrs}")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        resolve_submodule_names(self._extractor(pl_module), self.head)  # fail on a bad name before training starts
        strategy = getattr(trainer, "strategy", None)
        if (self.n_epochs > 0 and isinstance(strategy, DDPStrategy)
                and not ddp_finds_unused_parameters(strategy)):
            # DDP registers every parameter at wrap time and waits for its gradient: frozen ones never come.
            raise ValueError(
                "freeze_n_epochs > 0 under DDP needs find_unused_parameters=True "
                "(trainer strategy `ddp_find_unused_parameters_true`), otherwise DDP fails in the first frozen step"
            )

    def freeze(self, extractor: nn.Module) -> None:
        if self.is_frozen:
            return
        head = resolve_submodule_names(extractor, self.head)
        self._saved_requires_grad = freeze_backbone(extractor, head)
        log.info("freeze_n_epochs=%d: backbone frozen (trainable head: %s)", self.n_epochs, head or "none")

    def unfreeze(self, extractor: nn.Module) -> None:
        if self._saved_requires_grad is None:
            return
        unfreeze_backbone(extractor, self._saved_requires_grad)
        self._saved_requires_grad = None
        log.info("freeze_n_epochs=%d reached: backbone unfrozen", self.n_epochs)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extractor = self._extractor(pl_module)
        if trainer.current_epoch < self.n_epochs:
            self.freeze(extractor)
        else:
            self.unfreeze(extractor)
        keep_frozen_bn_in_eval(extractor)
