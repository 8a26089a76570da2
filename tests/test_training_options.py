"""Training options wired through train(cfg): freezing, per-group learning rates, warm-up, sampler checks."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from metriclab.core.errors import ConfigError
from metriclab.jobs.train import train
from metriclab.models.extractors import build_extractor
from tests.helpers import compose_cfg, fast_overrides

BASE = ["sampler.n_labels=4", "sampler.n_instances=3", "optimizer.lr=1e-2"]


def _history(tmp_path, run_id, key):
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_trainable_and_freeze_bn_leave_the_rest_bit_identical(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + [
        "extractor.trainable=[layer4]", "extractor.freeze_bn=true", "trainer.max_epochs=2"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    initial = {k: v.clone() for k, v in build_extractor(cfg.extractor).state_dict().items()}  # same seed, same init
    result = train(cfg)
    trained = torch.load(result["last_ckpt"], weights_only=True)["state_dict"]
    trained = {k[len("extractor."):]: v for k, v in trained.items() if k.startswith("extractor.")}
    changed = {k for k in initial if not torch.equal(initial[k], trained[k])}
    assert changed, "nothing trained"
    assert all(".layer4." in k for k in changed), sorted(changed)[:5]
    bn_stats = [k for k in initial if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert bn_stats and not any(k in changed for k in bn_stats)  # BN statistics frozen everywhere, layer4 included
    assert any(k.endswith("conv1.weight") and ".layer4." in k for k in changed)


def test_group_learning_rates_and_warmup_are_logged_per_epoch(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + [
        "criterion=arcface", "lr_criterion=0.05", "scheduler=warmup_cosine", "scheduler.warmup_epochs=2",
        "scheduler.start_factor=0.1", "trainer.max_epochs=3"])
    result = train(cfg)
    backbone = _history(tmp_path, result["mlflow_run_id"], "lr/backbone")
    criterion = _history(tmp_path, result["mlflow_run_id"], "lr/criterion")
    # LinearLR: factor 0.1 -> 1 over 2 epochs (0.1, 0.55), then cosine from the full rate over 1 epoch
    assert backbone[0] == pytest.approx(1e-3) and backbone[1] == pytest.approx(5.5e-3)
    assert backbone[2] == pytest.approx(1e-2)
    assert criterion[0] == pytest.approx(5e-3) and criterion[2] == pytest.approx(5e-2)


def test_triplet_loss_without_a_balanced_sampler_is_a_config_error(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + ["criterion=triplet_hard", "~sampler"])
    with pytest.raises(ConfigError, match="sampler=balance"):
        train(cfg)


def test_unknown_trainable_name_is_a_config_error(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + ["extractor.trainable=[layer9]"])
    with pytest.raises(ConfigError, match="layer9"):
        train(cfg)


def test_freeze_n_epochs_trains_only_the_loss_first(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + [
        "criterion=arcface", "freeze_n_epochs=1", "trainer.max_epochs=1"])
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    initial = build_extractor(cfg.extractor).state_dict()
    result = train(cfg)
    sd = torch.load(result["last_ckpt"], weights_only=True)["state_dict"]
    extractor = {k[len("extractor."):]: v for k, v in sd.items() if k.startswith("extractor.")}
    assert all(torch.equal(initial[k], extractor[k]) for k in initial)  # backbone frozen during epoch 0
    assert "criterion.weight" in sd  # ArcFace's class weights are saved with the checkpoint


@pytest.mark.parametrize("every, epochs, steps", [(2, 3, [1, 2]), (5, 2, [1])])
def test_the_last_epoch_is_always_validated(tmp_path, tiny_dataset, every, epochs, steps):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + [
        f"trainer.check_val_every_n_epoch={every}", f"trainer.max_epochs={epochs}"])
    result = train(cfg)
    history = _history(tmp_path, result["mlflow_run_id"], "val/mAP")
    assert sorted(history) == steps
    assert history[epochs - 1] == pytest.approx(result["metrics"]["mAP"])
    best_epoch = min(step for step, value in history.items() if value == max(history.values()))
    assert torch.load(result["best_ckpt"], weights_only=True)["epoch"] == best_epoch
    assert (result["run_dir"] / "worst_queries" / f"epoch_{epochs - 1:03d}" / "worst_queries.png").exists()


def test_validate_before_training_publishes_the_untrained_model_under_init(tmp_path, tiny_dataset):
    import json

    from metriclab.core.checkpoint import CheckpointMeta

    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + BASE + [
        "validate_before_training=true", "trainer.max_epochs=1", "extractor.freeze_bn=true"])
    result = train(cfg)
    run_dir, init = result["run_dir"], result["init_metrics"]
    assert set(init) == set(result["metrics"]) and 0.0 < init["mAP"] <= 1.0
    assert json.loads((run_dir / "metrics_init.json").read_text()) == pytest.approx(init)
    assert json.loads((run_dir / "metrics.json").read_text()) == pytest.approx(result["metrics"])  # the trained one
    assert _history(tmp_path, result["mlflow_run_id"], "init/mAP") == {0: pytest.approx(init["mAP"])}
    assert _history(tmp_path, result["mlflow_run_id"], "val/mAP") == {0: pytest.approx(result["metrics"]["mAP"])}
    assert (run_dir / "worst_queries" / "init" / "worst_queries.png").exists()
    assert (run_dir / "worst_queries" / "epoch_000" / "worst_queries.png").exists()
    # the checkpoint names its run, its folder and the extractor's constructor (training-only keys left out)
    meta = CheckpointMeta.from_checkpoint(torch.load(result["last_ckpt"], weights_only=True))
    assert meta.mlflow_run_id == result["mlflow_run_id"] and meta.run_dir == str(run_dir)
    assert meta.extractor_cfg["_target_"] == "oml.models.ResnetExtractor" and meta.extractor_cfg["arch"] == "resnet18"
    assert "freeze_bn" not in meta.extractor_cfg and "trainable" not in meta.extractor_cfg
