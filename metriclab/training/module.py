"""The LightningModule: an OML extractor trained with a metric-learning criterion, validated on query/gallery."""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.trainer.states import TrainerFn
from torch.utils.data import DataLoader

from metriclab.data.datasets import ValidationData
from metriclab.evaluation.pictures import evaluate_validation
from metriclab.training.publish import publish_validation
from metriclab.tracking.run import TrackedRun


class MetricLearningModule(pl.LightningModule):
    def __init__(
        self,
        extractor: torch.nn.Module,
        criterion: torch.nn.Module,
        optimizer_factory: Optional[Callable[..., torch.optim.Optimizer]],
        val_data: ValidationData,
        eval_cfg: DictConfig,
        scheduler_factory: Optional[Callable[..., Any]] = None,
        tracked: Optional[TrackedRun] = None,
        run_dir: Optional[Path] = None,
        checkpoint_extra: Optional[Dict[str, Any]] = None,
        train_loader: Optional[DataLoader] = None,
        val_loader: Optional[DataLoader] = None,
        head: Optional[List[str]] = None,
        group_lrs: Optional[Dict[str, Optional[float]]] = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.extractor = extractor
        self.criterion = criterion
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.val_data = val_data
        self.eval_cfg = eval_cfg
        self.tracked = tracked
        self.run_dir = Path(run_dir) if run_dir else None
        self.checkpoint_extra = checkpoint_extra or {}
        self.last_metrics: Dict[str, float] = {}
        self.last_embeddings: Optional[torch.Tensor] = None
        self._val_outputs: List[tuple] = []
        self._train_sums: Dict[str, float] = defaultdict(float)
        self._train_batches = 0
        self.val_epoch_offset = 0  # validate.py: the epoch of the evaluated checkpoint, for step and folder names
        self.val_tag: Optional[str] = None  # "init": the pass before training, logged as init/<metric>
        self.last_validated_epoch = -1
        self._train_loader, self._val_loader = train_loader, val_loader
        self.head = list(head or [])
        self.group_lrs = {k: v for k, v in (group_lrs or {}).items() if v is not None}
        self.channels_last = channels_last
        self._train_flushed_epoch = -1
        if channels_last:  # faster convolutions on GPUs with tensor cores; inputs are converted in the steps
            self.extractor = self.extractor.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(self._images(images))

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ------------------------------------------------------------- data (DDP)
    def _patched(self, loader: Optional[DataLoader]) -> Optional[DataLoader]:
        if loader is not None and self.trainer.world_size > 1:
            # OML's wrapper splits whole batches of any (batch) sampler across ranks, padding the last ones;
            # validation rows repeated by the padding are de-duplicated by index in _gather_embeddings
            from oml.ddp.patching import patch_dataloader_to_ddp

            return patch_dataloader_to_ddp(loader)
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._patched(self._train_loader)

    def val_dataloader(self) -> DataLoader:
        return self._patched(self._val_loader)

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        embeddings = self.extractor(self._images(batch["input_tensors"]))
        loss = self.criterion(embeddings, batch["labels"])
        value = float(loss.detach())  # one device sync for the check and the epoch sum
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {self.current_epoch}, batch {batch_idx}: lower "
                                     f"the learning rate or check the criterion/miner config")
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(embeddings))
        self._train_sums["train/loss"] += value
        for k, v in (getattr(self.criterion, "last_logs", None) or {}).items():
            self._train_sums[f"train/{k}"] += float(v)
        self._train_batches += 1
        return loss

    def on_train_epoch_start(self) -> None:
        from metriclab.models.freezing import keep_frozen_bn_in_eval

        keep_frozen_bn_in_eval(self.extractor)  # Lightning puts every layer back in train mode each epoch
        self._train_sums.clear()
        self._train_batches = 0
        # the rates this epoch trains with (an epoch-interval scheduler steps before the epoch's metrics are logged)
        self._epoch_lrs = {f"lr/{g.get('name', i)}": g["lr"]
                           for i, g in enumerate(self.trainer.optimizers[0].param_groups)}

    def _flush_train_metrics(self) -> None:
        """Log the epoch's training metrics once, before its validation: the checkpoint written after validation
        then never precedes them, so a resumed run has no epoch missing."""
        if self._train_flushed_epoch == self.current_epoch or not self._train_batches:
            return
        self._train_flushed_epoch = self.current_epoch
        if self.tracked is None or not self.trainer.is_global_zero:
            return
        metrics = {k: v / self._train_batches for k, v in self._train_sums.items()}
        metrics.update(self._epoch_lrs)
        self.tracked.log_metrics(metrics, step=self.current_epoch)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.trainer.is_last_batch:  # before the epoch-end checkpoint callbacks run
            self._flush_train_metrics()

    def on_train_epoch_end(self) -> None:
        self._flush_train_metrics()

    def configure_optimizers(self):
        from metriclab.models.freezing import params_under, resolve_submodule_names

        head_names = resolve_submodule_names(self.extractor, self.head) if self.head else []
        head_ids = params_under(self.extractor, head_names)
        groups = [
            {"name": "backbone", "params": [p for p in self.extractor.parameters()
                                            if p.requires_grad and id(p) not in head_ids]},
            {"name": "head", "params": [p for p in self.extractor.parameters() if p.requires_grad and id(p) in head_ids]},
            {"name": "criterion", "params": [p for p in self.criterion.parameters() if p.requires_grad]},
        ]
        for g in groups:  # a group without its own rate uses the optimizer's
            if g["name"] in self.group_lrs:
                g["lr"] = float(self.group_lrs[g["name"]])
        groups = [g for g in groups if g["params"]]
        optimizer = self.optimizer_factory(params=groups)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    # -------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_outputs = []
        if self.trainer.state.fn == TrainerFn.FITTING:
            self._flush_train_metrics()

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        extract = getattr(self.extractor, "extract", self.extractor)
        embeddings = extract(self._images(batch["input_tensors"]))
        self._val_outputs.append((batch["idx"].detach(), embeddings.detach().float()))

    def _gather_embeddings(self) -> torch.Tensor:
        idx = torch.cat([i for i, _ in self._val_outputs])
        emb = torch.cat([e for _, e in self._val_outputs])
        if self.trainer.world_size > 1:  # every rank gets every row; the distributed sampler pads with repeats
            idx = self.all_gather(idx).reshape(-1)
            emb = self.all_gather(emb).reshape(-1, emb.shape[-1])
        n = len(self.val_data.df)
        out = torch.full((n, emb.shape[-1]), float("nan"), dtype=torch.float32)
        out[idx.cpu()] = emb.cpu()
        missing = torch.isnan(out).any(dim=1)
        if missing.any():
            raise RuntimeError(f"validation produced no embedding for {int(missing.sum())} of {n} rows")
        return out

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        embeddings = self._gather_embeddings()
        self._val_outputs = []
        report = evaluate_validation(embeddings, self.val_data, self.eval_cfg)
        metrics = {k: float(v) for k, v in report.metrics.items()}
        self.last_metrics, self.last_embeddings = metrics, embeddings
        # every rank logs the same values: checkpointing may monitor them on any rank
        self.log_dict({f"val/{k}": v for k, v in metrics.items() if not math.isnan(v)}, logger=False)
        if not self.val_tag:
            self.last_validated_epoch = self.current_epoch + self.val_epoch_offset
        if not self.trainer.is_global_zero:
            return
        publish_validation(report, embeddings, self.val_data, self.eval_cfg, self.tracked, self.run_dir,
                           epoch=self.current_epoch + self.val_epoch_offset, tag=self.val_tag)

    # -------------------------------------------------------------- checkpoint
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        # enough to rebuild the extractor and to resume into the same tracker run
        checkpoint["metriclab"] = {
            **self.checkpoint_extra,
            "mlflow_run_id": self.tracked.mlflow_run_id if self.tracked else None,
        }
