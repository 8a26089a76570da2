"""The experiment configs: what each one sets, and that each trains end to end (CPU, random init, tiny data)."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from metriclab.core.config import flatten
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.train import train
from tests.helpers import compose_cfg, fast_overrides

EXPERIMENTS = ["market_arcface", "market_triplet", "market_bot", "cars_triplet", "cars_arcface", "fruits_arcface",
               "fruits_cosface", "fruits_sphereface", "fruits_subcenter_arcface", "digits_demo", "sop_triplet",
               "sop_proxy_anchor", "cub_triplet", "cub_proxy_anchor", "inshop_triplet", "msmt17_bot", "glyphs_demo"]


def _plain(name, tmp_path):
    return compose_cfg(name, [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                              f"dataset.root={tmp_path}"])


def test_every_experiment_config_is_listed():
    primaries = {p.stem for p in CONFIGS_DIR.glob("*.yaml")} - {"train", "validate", "predict", "explain", "export"}
    assert primaries == set(EXPERIMENTS)


def test_experiments_set_what_their_recipes_say(tmp_path):
    market = {n: _plain(n, tmp_path) for n in ("market_arcface", "market_triplet", "market_bot")}
    for cfg in market.values():
        assert (cfg.transforms.train.height, cfg.transforms.train.width) == (256, 128)
        assert (cfg.sampler.n_labels, cfg.sampler.n_instances) == (16, 4)
        assert cfg.extractor.weights == "resnet50_imagenet1k_v1" and cfg.metric_for_checkpointing == "mAP"
    assert market["market_triplet"].criterion.margin == 0.3
    assert market["market_bot"].criterion.triplet.margin == 0.3
    assert market["market_bot"].criterion.classification.label_smoothing == 0.1
    assert list(market["market_bot"].scheduler.milestones) == [40, 70]
    assert market["market_bot"].trainer.max_epochs == 120
    assert market["market_arcface"].criterion._target_ == "metriclab.models.losses.ArcFaceLoss"
    cars = _plain("cars_triplet", tmp_path)
    assert list(cars.evaluation.cmc_top_k) == [1, 2, 4, 8] and cars.extractor.weights == "vits16_dino"
    assert cars.sampler._target_.endswith("CategoryBalanceSampler")
    # the four fruit configs differ only in the loss: one multirun over `criterion` compares them
    for loss in ("arcface", "cosface", "sphereface", "subcenter_arcface"):
        assert _plain(f"fruits_{loss}", tmp_path).criterion.label_smoothing == 0.1  # as the README says
    base = dict(flatten(_plain("fruits_arcface", tmp_path)))
    for loss in ("cosface", "sphereface", "subcenter_arcface"):
        other = dict(flatten(_plain(f"fruits_{loss}", tmp_path)))
        differing = {k for k in base.keys() | other.keys() if base.get(k) != other.get(k)}
        assert differing and all(k.startswith("criterion.") or k == "timestamp" for k in differing), differing


def test_benchmark_recipes_set_their_protocols(tmp_path):
    sop, sop_pa = _plain("sop_triplet", tmp_path), _plain("sop_proxy_anchor", tmp_path)
    for cfg in (sop, sop_pa):
        assert list(cfg.evaluation.cmc_top_k) == [1, 10, 100, 1000] and cfg.metric_for_checkpointing == "cmc@1"
    assert sop.sampler._target_.endswith("CategoryBalanceSampler") and sop.sampler.n_instances == 2
    for cfg in (sop_pa, _plain("cub_proxy_anchor", tmp_path)):  # the Proxy-Anchor paper's optimiser and batches
        assert cfg.criterion._target_.endswith("ProxyAnchorLoss") and cfg.get("sampler") is None
        assert (cfg.optimizer.lr, cfg.lr_criterion, cfg.batch_size) == (1e-4, 1e-2, 180)
        assert (cfg.criterion.alpha, cfg.criterion.margin) == (32.0, 0.1)
    assert list(_plain("cub_triplet", tmp_path).evaluation.cmc_top_k) == [1, 2, 4, 8]
    assert list(_plain("inshop_triplet", tmp_path).evaluation.cmc_top_k) == [1, 10, 20, 30, 40, 50]
    # msmt17_bot is market_bot's recipe on other data: the same values everywhere
    bot, msmt = dict(flatten(_plain("market_bot", tmp_path))), dict(flatten(_plain("msmt17_bot", tmp_path)))
    assert {k for k in bot.keys() | msmt.keys() if bot.get(k) != msmt.get(k)} <= {"timestamp"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_trains_one_epoch_on_cpu(tmp_path, tiny_dataset, name):
    cfg = _plain(name, tmp_path)
    overrides = fast_overrides(tmp_path, tiny_dataset) + ["trainer=cpu", "num_workers=0",
                                                          "trainer.check_val_every_n_epoch=1"]
    if cfg.get("sampler") is None:
        overrides.append("batch_size=8")
    else:
        overrides += ["sampler.n_labels=2", "sampler.n_instances=3"]
        if "n_categories" in cfg.sampler:
            overrides.append("sampler.n_categories=2")
    if cfg.get("scheduler") is not None and "warmup_epochs" in cfg.scheduler:
        overrides.append("scheduler.warmup_epochs=0")
    result = train(compose_cfg(name, overrides))
    assert 0.0 < result["metrics"]["mAP"] <= 1.0 and result["metrics"]["n_queries"] == 18
    saved = OmegaConf.load(result["run_dir"] / "config.yaml")
    assert saved.criterion._target_ == cfg.criterion._target_  # the experiment's loss, not the base default
