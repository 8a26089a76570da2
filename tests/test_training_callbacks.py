"""The training layer piece by piece: the data module's loaders, the module's step outputs and validation
embeddings, and the callbacks (training metrics, last-epoch validation, checkpoint metadata), on tiny tensors."""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from metriclab.core.checkpoint import CHECKPOINT_META_KEY, CheckpointMeta
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.data.datamodule import MetricLearningDataModule
from metriclab.data.datasets import build_train_data, build_validation_data, read_dataset_csv
from metriclab.training.callbacks import CheckpointMetadata, TrainingMetrics, ValidateLastEpoch
from metriclab.training.module import TRAIN_LOGS_KEY, MetricLearningModule
from tests.helpers import compose_cfg

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ data module
def _datamodule(root: Path, sampler: Any = None, **kwargs) -> MetricLearningDataModule:
    cfg = compose_cfg("train", [f"dataset.root={root}", "transforms=digits"])
    df = read_dataset_csv(root)
    train_data = build_train_data(df, root, build(cfg.transforms.train, "transforms.train"))
    val_data = build_validation_data(df, root, build(cfg.transforms.val, "transforms.val"))
    sampler = OmegaConf.create(sampler) if sampler is not None else None  # a config group, as train() passes it
    return MetricLearningDataModule(train_data, val_data, sampler, **kwargs)


def test_datamodule_builds_sampler_batches_plain_batches_and_ordered_validation(tiny_dataset):
    # tiny_dataset: 4 train labels x 6 images, 3 validation labels x 6 images
    balance = {"_target_": "metriclab.data.samplers.BalanceSampler", "n_labels": 2, "n_instances": 3}
    dm = _datamodule(tiny_dataset, balance, batch_size_val=7)
    batches = list(dm.train_dataloader())
    assert len(batches) == 2  # 4 usable labels // 2 labels per batch
    for batch in batches:
        labels = batch["labels"].tolist()
        assert len(labels) == 6 and sorted(np.unique(labels, return_counts=True)[1].tolist()) == [3, 3]
    val = list(dm.val_dataloader())
    assert [len(b["idx"]) for b in val] == [7, 7, 4]
    assert torch.cat([b["idx"] for b in val]).tolist() == list(range(18))  # dataset row order
    assert dm.train_dataloader() is dm.train_loader  # one process: no DDP wrapping

    plain = _datamodule(tiny_dataset, None, batch_size=5)
    sizes = [len(b["idx"]) for b in plain.train_dataloader()]
    assert sizes == [5, 5, 5, 5]  # 24 images, the incomplete last batch dropped


@pytest.mark.parametrize("sampler, batch_size, message", [
    (None, 25, "the train loader yields no batch: 24 train images are too few for the sampler/batch size"),
    ({"_target_": "metriclab.data.samplers.BalanceSampler", "n_labels": 5, "n_instances": 3}, 64,
     "`sampler` could not be built: .*n_labels=5 but only 4 of 4 train labels"),  # the sampler's own check
])
def test_datamodule_with_no_train_batch_is_a_config_error(tiny_dataset, sampler, batch_size, message):
    with pytest.raises(ConfigError, match=message):
        _datamodule(tiny_dataset, sampler, batch_size=batch_size)


# ------------------------------------------------------------------------------------------- module + callbacks
class _Rows(Dataset):
    """Items as OML's datasets give them; labels [0, 0, 0, 0, 1, 1, 1, 1]."""

    def __init__(self, n: int = 8):
        self.x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {"input_tensors": self.x[i], "labels": torch.tensor(int(i >= len(self.x) // 2)), "idx": i}


class _Criterion(nn.Module):
    """A loss with its own parameter and a per-batch log, like OML's triplet loss (`last_logs`)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.last_logs: Dict[str, float] = {}

    def forward(self, embeddings, labels):
        self.last_logs = {"label_mean": float(labels.float().mean())}
        return (embeddings.pow(2).mean(dim=1) * self.scale).mean()


class _StubTracker:
    mlflow_run_id = "run-123"

    def __init__(self, events: List[tuple]):
        self.events = events

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        self.events.append(("log", step, dict(metrics)))


class _Recorder(pl.Callback):
    """The loss of every batch, when checkpoints are saved, and the embeddings of each validation pass."""

    def __init__(self, events: List[tuple], n_val_rows: int = 8):
        self.events, self.losses, self.embeddings, self.n_val_rows = events, [], [], n_val_rows

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.current_epoch, float(outputs["loss"]), outputs[TRAIN_LOGS_KEY]))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        self.events.append(("save", checkpoint["epoch"]))

    def on_validation_epoch_end(self, trainer, pl_module):
        self.embeddings.append((trainer.current_epoch, pl_module.validation_embeddings(self.n_val_rows)))


def _module() -> MetricLearningModule:
    torch.manual_seed(0)
    return MetricLearningModule(nn.Linear(4, 3), _Criterion(), functools.partial(torch.optim.SGD, lr=0.1),
                                group_lrs={"criterion": 0.01, "head": None})


def _trainer(tmp_path: Path, callbacks: list, **kwargs) -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, default_root_dir=str(tmp_path), callbacks=callbacks, **kwargs)


def test_training_metrics_are_epoch_means_logged_before_the_epochs_checkpoint(tmp_path):
    events: List[tuple] = []
    recorder = _Recorder(events)
    meta = CheckpointMeta(extractor_cfg={"_target_": "x.Y", "dim": 3}, run_dir=str(tmp_path), mlflow_run_id="run-123")
    last = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_top_k=0, save_last=True,
                                        save_on_train_epoch_end=True)
    trainer = _trainer(tmp_path, [TrainingMetrics(_StubTracker(events)), recorder, CheckpointMetadata(meta), last],
                       max_epochs=2, limit_val_batches=0)
    trainer.fit(_module(), train_dataloaders=DataLoader(_Rows(), batch_size=4))

    assert [e[:2] for e in events] == [("log", 0), ("save", 0), ("log", 1), ("save", 1)]
    for epoch in (0, 1):
        logged = events[2 * epoch][2]
        losses = [loss for e, loss, _ in recorder.losses if e == epoch]
        assert len(losses) == 2
        assert logged["train/loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
        assert logged["train/label_mean"] == pytest.approx(0.5)  # batches of labels 0,0,0,0 and 1,1,1,1
        assert logged["lr/backbone"] == 0.1 and logged["lr/criterion"] == 0.01
        assert set(logged) == {"train/loss", "train/label_mean", "lr/backbone", "lr/criterion"}  # no empty head
    assert all(logs["train/loss"] == pytest.approx(loss, rel=1e-6) for _, loss, logs in recorder.losses)

    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt[CHECKPOINT_META_KEY] == {"extractor_cfg": {"_target_": "x.Y", "dim": 3}, "run_dir": str(tmp_path),
                                         "mlflow_run_id": "run-123", "threshold": None, "threshold_fmr": None,
                                         "threshold_distance": None}  # no publisher here: no calibration
    assert CheckpointMeta.from_checkpoint(ckpt) == meta


def test_non_finite_loss_is_an_error_naming_the_epoch_and_batch(tmp_path):
    module = _module()
    with torch.no_grad():
        module.criterion.scale.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="loss is nan at epoch 0, batch 0"):
        _trainer(tmp_path, [], max_epochs=1, limit_val_batches=0).fit(
            module, train_dataloaders=DataLoader(_Rows(), batch_size=4))


def test_validation_embeddings_come_back_in_dataset_row_order(tmp_path):
    module = _module()
    rows = _Rows()
    recorder = _Recorder([])
    shuffled = DataLoader(rows, batch_size=3, sampler=[5, 2, 7, 0, 1, 6, 3, 4])
    _trainer(tmp_path, [recorder]).validate(module, dataloaders=shuffled, verbose=False)
    (_, embeddings), = recorder.embeddings
    with torch.no_grad():
        expected = module.extractor(rows.x)
    assert torch.allclose(embeddings, expected, atol=1e-6)

    recorder = _Recorder([], n_val_rows=10)  # two rows the loader never gave
    with pytest.raises(RuntimeError, match="validation produced no embedding for 2 of 10 rows"):
        _trainer(tmp_path, [recorder]).validate(module, dataloaders=shuffled, verbose=False)


@pytest.mark.parametrize("every, epochs, validated", [(3, 4, [2, 3]), (2, 4, [1, 3]), (1, 2, [0, 1]),
                                                      (5, 3, [2])])
def test_validate_last_epoch_adds_only_the_last_epoch(tmp_path, every, epochs, validated):
    recorder = _Recorder([])
    trainer = _trainer(tmp_path, [recorder, ValidateLastEpoch()], max_epochs=epochs, check_val_every_n_epoch=every)
    loader = DataLoader(_Rows(), batch_size=4)
    trainer.fit(_module(), train_dataloaders=loader, val_dataloaders=loader)
    assert [epoch for epoch, _ in recorder.embeddings] == validated
    assert trainer.check_val_every_n_epoch == every  # put back after training
