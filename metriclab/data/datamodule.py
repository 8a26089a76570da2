"""The loaders of a training run, as a LightningDataModule: the train batches (a batch sampler built from config, or
plain shuffled batches) and the validation rows in order, each split across DDP ranks when there are several."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Union

import pytorch_lightning as pl
from torch.utils.data import BatchSampler, DataLoader, Sampler

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import TrainData, ValidationData


class ReplayedBatches(Sampler):
    """The batches of one pass of `batch_sampler`, drawn once and replayed unchanged every epoch: what
    `trainer.overfit_batches` means. Lightning makes a shuffled loader sequential for it, but a batch sampler (n x k)
    draws new batches each epoch, which it cannot see."""

    def __init__(self, batch_sampler: Any):
        self.batch_sampler = batch_sampler
        self.batches: Optional[List[List[int]]] = None

    def __iter__(self) -> Iterator[List[int]]:
        if self.batches is None:
            self.batches = [list(batch) for batch in self.batch_sampler]
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches) if self.batches is not None else len(self.batch_sampler)


class MetricLearningDataModule(pl.LightningDataModule):
    """`sampler`: the `sampler` config group (`_target_` + values; the labels come from `train_data`), or None for
    shuffled batches of `batch_size` (classification losses do not need n x k batches).

    The loaders are built here, at once, so a train split too small for one batch is a ConfigError before any
    training starts; Lightning asks for them when a loop starts."""

    def __init__(self, train_data: TrainData, val_data: ValidationData, sampler: Optional[Any] = None,
                 batch_size: int = 64, batch_size_val: int = 128, num_workers: int = 0,
                 extra_val: Optional[Dict[str, ValidationData]] = None):
        super().__init__()
        self.train_data, self.val_data = train_data, val_data
        self.extra_val = dict(extra_val or {})  # cross-dataset sets: validation loaders 1, 2, ... in this order
        self.train_loader = self._train_loader(sampler, batch_size, num_workers)
        self.val_loaders = [DataLoader(data.dataset, batch_size=batch_size_val, shuffle=False, num_workers=num_workers)
                            for data in (val_data, *self.extra_val.values())]

    def _train_loader(self, sampler_node: Optional[Any], batch_size: int, num_workers: int) -> DataLoader:
        data = self.train_data
        if sampler_node is not None:
            sampler = build(sampler_node, "sampler", labels=data.labels.tolist(), label2category=data.label2category)
            loader = DataLoader(data.dataset, batch_sampler=sampler, num_workers=num_workers)
        else:
            loader = DataLoader(data.dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                num_workers=num_workers)
        if len(loader) == 0:
            raise ConfigError(f"the train loader yields no batch: {len(data.dataset)} train images are too few for "
                              f"the sampler/batch size; lower `sampler.n_labels`/`sampler.n_instances`/`batch_size`")
        return loader

    def _for_ranks(self, loader: DataLoader) -> DataLoader:
        if self.trainer is not None and self.trainer.world_size > 1:
            # OML's wrapper splits whole batches of any (batch) sampler across ranks, padding the last ones;
            # validation rows repeated by the padding are de-duplicated by index when the embeddings are gathered
            from oml.ddp.patching import patch_dataloader_to_ddp

            return patch_dataloader_to_ddp(loader)
        return loader

    def train_dataloader(self) -> DataLoader:
        loader = self.train_loader
        batch_sampler = loader.batch_sampler
        overfit = getattr(self.trainer, "overfit_batches", 0) if self.trainer is not None else 0
        if (overfit > 0 and batch_sampler is not None
                and not isinstance(batch_sampler, (BatchSampler, ReplayedBatches))):
            # overfit_batches: the same first batches every epoch (debug=overfit)
            loader = DataLoader(loader.dataset, batch_sampler=ReplayedBatches(batch_sampler),
                                num_workers=loader.num_workers)
            self.train_loader = loader
        return self._for_ranks(loader)

    def val_dataloader(self) -> Union[DataLoader, List[DataLoader]]:
        """The main validation rows; with extra validation sets, a list: the main set first (dataloader 0)."""
        loaders = [self._for_ranks(loader) for loader in self.val_loaders]
        return loaders[0] if len(loaders) == 1 else loaders
