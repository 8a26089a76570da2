"""`debug=<name>` (configs/debug/): each mode composes, passes the entry checks and trains end to end on tiny data,
leaving a FINISHED run in the debug experiment, tagged and named as a debug run; validation always sees every row."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Dict, List

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.checks import check_config
from metriclab.jobs.train import train
from metriclab.tracking.debug import DEBUG_TAG, as_debug_run
from metriclab.training.module import MetricLearningModule
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

MODES = sorted(p.stem for p in (CONFIGS_DIR / "debug").glob("*.yaml"))
#: 4 train classes x 6 images: n_labels=2 -> 2 batches of 6 per epoch
TWO_BATCHES = ["sampler.n_labels=2", "sampler.n_instances=3"]


def _fast(tmp_path: Path, root: Path) -> List[str]:
    """fast_overrides without max_epochs: the debug mode sets it."""
    return [o for o in fast_overrides(tmp_path, root) if not o.startswith("trainer.max_epochs")]


def _debug_run(tmp_path: Path, result: Dict, mode: str):
    """The one run of this store: FINISHED, in the debug experiment, tagged and named as a debug run."""
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert "metriclab" not in experiments  # nothing in the experiment of real results
    runs = client.search_runs([experiments["metriclab-debug"]])
    assert [r.info.run_id for r in runs] == [result["mlflow_run_id"]]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags[DEBUG_TAG] == mode
    assert run.info.run_name.startswith(f"debug-{mode}-train-") and result["run_name"] == run.info.run_name
    assert run.data.params["logger.experiment_name"] == "metriclab-debug"
    return client, run


def _record_training_steps(monkeypatch) -> List[Dict]:
    """Every training step's epoch, batch rows and whether autograd's anomaly mode was on."""
    steps: List[Dict] = []
    original = MetricLearningModule.training_step

    def recording(self, batch, batch_idx):
        steps.append({"epoch": self.current_epoch, "idx": batch["idx"].tolist(),
                      "anomaly": torch.is_anomaly_enabled()})
        return original(self, batch, batch_idx)

    monkeypatch.setattr(MetricLearningModule, "training_step", recording)
    return steps


@pytest.mark.parametrize("mode", MODES)
def test_debug_config_composes_and_passes_the_checks(tmp_path, tiny_dataset, mode):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + [f"debug={mode}"])
    check_config(cfg)
    assert cfg.debug.name == mode and cfg.debug.experiment_suffix == "-debug"
    assert cfg.num_workers == 0 and cfg.trainer.devices == 1
    trainer_keys = set(inspect.signature(pl.Trainer.__init__).parameters)  # the trainer group's schema
    assert set(cfg.trainer) - {"_target_"} <= trainer_keys
    text = (CONFIGS_DIR / "debug" / f"{mode}.yaml").read_text(encoding="utf-8")
    assert text.startswith("# @package _global_")
    for line in text.splitlines():  # every key commented
        if line.strip() and not line.lstrip().startswith(("#", "-")) and not line.rstrip().endswith(":"):
            assert "#" in line, f"{mode}.yaml: no comment on {line!r}"


def test_a_misspelt_debug_key_is_a_config_error(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + ["debug=limit", "+debug.nmae=x"])
    with pytest.raises(ConfigError, match="nmae"):
        check_config(cfg)


def test_a_real_run_is_left_alone_and_a_debug_run_renamed(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset))
    assert as_debug_run(cfg, "train-x") == (cfg, "train-x")
    debug_cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + ["debug=limit"])
    renamed, name = as_debug_run(debug_cfg, "train-x")
    assert name == "debug-limit-train-x" and renamed.logger.experiment_name == "metriclab-debug"
    assert debug_cfg.logger.experiment_name == "metriclab"  # a copy: the composed config is unchanged


def test_fast_dev_run_trains_one_step_validates_every_row_and_keeps_no_checkpoint(tmp_path, tiny_dataset):
    # 4 validation rows per batch: Lightning's fast_dev_run would embed 4 of the 18 rows; validation sees all of them
    cfg = compose_cfg("train", _fast(tmp_path, tiny_dataset) + ["debug=fast_dev_run", "batch_size_val=4"]
                      + TWO_BATCHES)
    result = train(cfg)
    assert result["global_step"] == 1
    assert result["metrics"]["n_queries"] == 18
    assert result["best_ckpt"] is None and result["last_ckpt"] is None
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))
    client, run = _debug_run(tmp_path, result, "fast_dev_run")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")] == [0]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [0]


def test_overfit_replays_the_same_batches_every_epoch_and_the_loss_falls(tmp_path, tiny_dataset, monkeypatch):
    steps = _record_training_steps(monkeypatch)
    cfg = compose_cfg("train", _fast(tmp_path, tiny_dataset) + ["debug=overfit", "optimizer.lr=1e-3"] + TWO_BATCHES)
    assert cfg.trainer.overfit_batches == 2
    result = train(cfg)
    epochs = cfg.trainer.max_epochs
    assert result["global_step"] == 2 * epochs
    batches = [[s["idx"] for s in steps if s["epoch"] == e] for e in range(epochs)]
    assert len(batches[0]) == 2 and len({tuple(map(tuple, b)) for b in batches}) == 1  # the same 2 every epoch
    assert batches[0][0] != batches[0][1]
    client, run = _debug_run(tmp_path, result, "overfit")
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert len(loss) == epochs and loss[-1] < 0.5 * loss[0], loss
    # validation every 10th epoch (and the last), on every validation row
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")] == [9, 19]
    assert result["metrics"]["n_queries"] == 18


def test_limit_trains_the_asked_fraction_of_the_batches(tmp_path):
    root = tmp_path / "data"
    write_tiny_dataset(root, n_train_classes=7, n_val_classes=3)  # 42 train images: 21 batches of 2
    cfg = compose_cfg("train", _fast(tmp_path, root) + ["debug=limit", "~sampler", "criterion=arcface",
                                                        "batch_size=2"])
    fraction, epochs = cfg.trainer.limit_train_batches, cfg.trainer.max_epochs
    assert (fraction, epochs) == (0.25, 3)
    result = train(cfg)
    assert result["global_step"] == epochs * int(21 * fraction) == 15
    client, run = _debug_run(tmp_path, result, "limit")
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")] == [0, 1, 2]
    assert result["metrics"]["n_queries"] == 18  # every validation row
    assert Path(result["best_ckpt"]).is_file() and Path(result["last_ckpt"]).is_file()


def test_profiler_writes_its_report_to_the_run_dir(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", _fast(tmp_path, tiny_dataset) + ["debug=profiler"] + TWO_BATCHES)
    result = train(cfg)
    report = Path(result["run_dir"]) / "fit-profiler.txt"
    assert report.is_file()
    text = report.read_text()
    assert "run_training_batch" in text and "Profiler Report" in text
    _debug_run(tmp_path, result, "profiler")
    assert OmegaConf.select(cfg, "trainer.profiler.dirpath") == f"{tmp_path}/run"


def test_detect_anomaly_trains_under_autograd_anomaly_mode(tmp_path, tiny_dataset, monkeypatch):
    steps = _record_training_steps(monkeypatch)
    cfg = compose_cfg("train", _fast(tmp_path, tiny_dataset) + ["debug=detect_anomaly"] + TWO_BATCHES)
    assert not torch.is_anomaly_enabled()
    result = train(cfg)
    assert len(steps) == 2 and all(s["anomaly"] for s in steps)
    assert not torch.is_anomaly_enabled()  # only around the steps
    _debug_run(tmp_path, result, "detect_anomaly")


def test_default_alone_is_a_normal_training_marked_as_debug(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", _fast(tmp_path, tiny_dataset) + ["debug=default"] + TWO_BATCHES)
    result = train(cfg)
    assert result["global_step"] == 2
    _debug_run(tmp_path, result, "default")
