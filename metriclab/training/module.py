"""The LightningModule: an OML extractor trained with a metric-learning criterion, embeddings for validation.

Modelling only: the forward pass, the loss, the optimizer's parameter groups and the validation embeddings. The
loaders come from `metriclab.data.datamodule`; evaluating, publishing, training metrics, checkpoint metadata and
freezing schedules are callbacks (`metriclab.training.callbacks`). Nothing here writes files or talks to a tracker.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Tuple, cast

import pytorch_lightning as pl
import torch

from metriclab.models.freezing import keep_frozen_bn_in_eval, params_under, resolve_submodule_names
from metriclab.models.tta import extract_maybe_flip

#: `training_step`'s output key holding this batch's plain-float training metrics (`train/loss`,
#: `train/<criterion log>`), averaged per epoch by `metriclab.training.callbacks.TrainingMetrics`
TRAIN_LOGS_KEY = "train_logs"


class MetricLearningModule(pl.LightningModule):
    def __init__(
        self,
        extractor: torch.nn.Module,
        criterion: torch.nn.Module,
        optimizer_factory: Callable[..., torch.optim.Optimizer],
        scheduler_factory: Optional[Callable[..., Any]] = None,
        head: Optional[List[str]] = None,
        group_lrs: Optional[Dict[str, Optional[float]]] = None,
        channels_last: bool = False,
        flip_tta: bool = False,
    ):
        super().__init__()
        self.extractor = extractor
        self.criterion = criterion
        self.optimizer_factory = optimizer_factory
        self.scheduler_factory = scheduler_factory
        self.head = list(head or [])
        self.group_lrs = {k: v for k, v in (group_lrs or {}).items() if v is not None}
        self.channels_last = channels_last
        self.flip_tta = flip_tta  # validation embeddings: mean of the image's and its mirror's (models.tta)
        # validation outputs per validation dataloader (0 = the main set, then the extra sets)
        self._val_outputs: Dict[int, List[Tuple[torch.Tensor, torch.Tensor]]] = {}
        if channels_last:  # faster convolutions on GPUs with tensor cores; inputs are converted in the steps
            self.extractor = self.extractor.to(memory_format=torch.channels_last)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(self._images(images))

    def _images(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    # ---------------------------------------------------------------- training
    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> Dict[str, Any]:
        embeddings = self.extractor(self._images(batch["input_tensors"]))
        loss = self.criterion(embeddings, batch["labels"])
        value = float(loss.detach())  # one device sync for the check and the epoch mean
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at epoch {self.current_epoch}, batch {batch_idx}: lower "
                                     f"the learning rate or check the criterion/miner config")
        self.log("loss", loss.detach(), prog_bar=True, logger=False, batch_size=len(embeddings))
        logs = {"train/loss": value}
        logs.update({f"train/{k}": float(v) for k, v in (getattr(self.criterion, "last_logs", None) or {}).items()})
        return {"loss": loss, TRAIN_LOGS_KEY: logs}

    def on_train_epoch_start(self) -> None:
        keep_frozen_bn_in_eval(self.extractor)  # Lightning puts every layer back in train mode each epoch

    def configure_optimizers(self):
        head_names = resolve_submodule_names(self.extractor, self.head) if self.head else []
        head_ids = params_under(self.extractor, head_names)
        trainable = [p for p in self.extractor.parameters() if p.requires_grad]
        groups = [
            {"name": "backbone", "params": [p for p in trainable if id(p) not in head_ids]},
            {"name": "head", "params": [p for p in trainable if id(p) in head_ids]},
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
        self._val_outputs = {}

    def validation_step(self, batch: Dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        extract = getattr(self.extractor, "extract", self.extractor)
        embeddings = extract_maybe_flip(extract, self._images(batch["input_tensors"]), self.flip_tta)
        self._val_outputs.setdefault(dataloader_idx, []).append((batch["idx"].detach(), embeddings.detach().float()))

    def validation_embeddings(self, n_rows: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The pass's embeddings of validation dataloader `dataloader_idx` as an `n_rows` x D CPU tensor in dataset
        row order, gathered from every DDP rank (a collective: every rank calls it); the outputs are released."""
        outputs = self._val_outputs.pop(dataloader_idx, [])
        idx = torch.cat([i for i, _ in outputs])
        emb = torch.cat([e for _, e in outputs])
        if self.trainer.world_size > 1:  # every rank gets every row; the distributed sampler pads with repeats
            idx = cast(torch.Tensor, self.all_gather(idx)).reshape(-1)
            emb = cast(torch.Tensor, self.all_gather(emb)).reshape(-1, emb.shape[-1])
        out = torch.full((n_rows, emb.shape[-1]), float("nan"), dtype=torch.float32)
        out[idx.cpu()] = emb.cpu()
        missing = torch.isnan(out).any(dim=1)
        if missing.any():
            raise RuntimeError(f"validation produced no embedding for {int(missing.sum())} of {n_rows} rows")
        return out
