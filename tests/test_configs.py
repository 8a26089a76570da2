"""Every primary config and every group option composes, and every component instantiates."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR, REPO_ROOT
from metriclab.core.schemas import (
    AlphaQEConfig,
    AverageQEConfig,
    DatasetConfig,
    DBAConfig,
    KReciprocalConfig,
    PathsConfig,
)
from metriclab.evaluation.postprocess import steps_from_config
from metriclab.jobs.checks import check_config
from metriclab.models.extractors import build_extractor
from tests.helpers import compose_cfg

GROUPS = ["dataset", "extractor", "criterion", "sampler", "optimizer", "scheduler", "transforms", "evaluation",
          "logger", "trainer", "paths", "index", "postprocess"]
#: the primary config that holds each group (the others are all in train.yaml)
PRIMARY_OF = {"index": "predict"}
#: SGD lr=0.1, trainer.max_epochs=10 (trainer=cpu): the rate of epochs 0, 1, 2, 3, 5, 10, 40, 70, by hand
#: cosine: 0.05 * (1 + cos(pi * e / 10)); step: x0.1 every 10; warmup_cosine: 0.01, 0.1 * (0.1 + 0.9 / 2), then
#: cosine over the 8 epochs left (e=3: 0.05 * (1 + cos(pi / 8))); warmup_multistep: 0.1 * (0.1 + 0.9 * e / 10) for
#: 10 epochs, then x0.1 at 40 and at 70
EXPECTED_LR = {
    "cosine": [0.1, 0.0975528, 0.0904508, 0.0793893, 0.05, 0.0, 0.1, 0.0],
    "step": [0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 1e-5, 0.0],
    "warmup_cosine": [0.01, 0.055, 0.1, 0.0961940, 0.0691342, 0.0, 0.0146447, 0.05],
    "warmup_multistep": [0.01, 0.019, 0.028, 0.037, 0.055, 0.1, 0.01, 0.001],
}
LR_EPOCHS = [0, 1, 2, 3, 5, 10, 40, 70]
PRIMARY = sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml"))
RUNTIME = {"num_classes": 6, "embedding_size": 16, "in_features": 16, "label2category": {i: i % 2 for i in range(6)},
           "labels": [i for i in range(6) for _ in range(4)]}


def _base(tmp_path: Path, config_name: str = "train"):
    return [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run", f"dataset.root={tmp_path}"]


def options(group: str):
    return sorted(p.stem for p in (CONFIGS_DIR / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"configs/{group}/ is empty"


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_composes_and_resolves(tmp_path, name):
    cfg = compose_cfg(name, _base(tmp_path))
    container = OmegaConf.to_container(cfg, resolve=True)  # `???` values (e.g. predict's ckpt) stay required
    assert container["paths"]["outputs_dir"] == str(tmp_path)
    assert container["task"] in {"train", "validate", "predict", "explain", "report"}
    if "logger" in container:
        expected_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path}/mlflow.db"
        assert container["logger"]["tracking_uri"] == expected_uri


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_instantiates(tmp_path, group, option):
    overrides = _base(tmp_path) + [f"{group}={option}"]
    cfg = compose_cfg(PRIMARY_OF.get(group, "train"), overrides)
    node = cfg[group]
    if group == "extractor":
        node.weights = None  # no network here: random init with the same architecture
        model = build_extractor(node)
        out = model(torch.zeros(1, 3, 224, 224))
        assert out.shape == (1, model.feat_dim)
    elif group == "criterion":
        crit = build(node, "criterion", **{k: RUNTIME[k] for k in ("num_classes", "embedding_size", "in_features",
                                                                     "label2category")})
        emb = torch.randn(24, 16)
        loss = crit(emb, torch.tensor(RUNTIME["labels"]))
        assert loss.ndim == 0 and torch.isfinite(loss)
    elif group == "sampler":
        node.n_labels, node.n_instances = 2, 2  # the runtime labels above: 6 labels x 4 images
        if "n_categories" in node:
            node.n_categories = 2
        sampler = build(node, "sampler", labels=RUNTIME["labels"], label2category=RUNTIME["label2category"])
        batch = next(iter(sampler))
        assert len(batch) > 0 and len(sampler) > 0
    elif group == "optimizer":
        params = [torch.nn.Parameter(torch.zeros(2))]
        opt = build(node, "optimizer")(params=[{"params": params}])
        assert isinstance(opt, torch.optim.Optimizer)
    elif group == "scheduler":
        assert cfg.trainer.max_epochs == 10  # the hand-computed rates assume it
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        sched = build(node, "scheduler")(optimizer=opt)
        rates = []
        for _ in range(max(LR_EPOCHS) + 1):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()  # once per epoch, as Lightning steps it
        assert [rates[e] for e in LR_EPOCHS] == pytest.approx(EXPECTED_LR[option], abs=1e-7)
    elif group == "transforms":
        import numpy as np

        for part in ("train", "val"):
            tf = build(node[part], f"transforms.{part}")
            img = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
            out = tf(image=img)["image"] if hasattr(tf, "processors") or type(tf).__module__.startswith("albu") \
                else tf(__import__("PIL.Image", fromlist=["Image"]).fromarray(img))
            assert out.ndim == 3 and out.shape[0] == 3
    elif group == "logger":
        check_logger(build(node, "logger", **({"save_dir": str(tmp_path)} if "TensorBoard" in node._target_ else {})),
                     option, tmp_path)
    elif group == "trainer":
        if node.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("no GPU on this machine: composition is checked, instantiation is not")
        assert build(node, "trainer", logger=False).max_epochs == node.max_epochs
    elif group == "evaluation":
        built = build(node, "evaluation")
        assert (built.distance, built.backend, built.cmc_top_k, built.map_top_k) == (
            "euclidean", "exact", [1, 5, 10], [5])
    elif group == "index":
        built = build(node, "index")
        assert (built.kind, built.m, built.ef_construction, built.ef_search) == (option, 32, 200, 128)
    elif group == "postprocess":
        expected = {"none": (), "k_reciprocal": (KReciprocalConfig(k1=20, k2=6, lambda_value=0.3),),
                    "aqe": (AverageQEConfig(k=5),), "alpha_qe": (AlphaQEConfig(k=5, alpha=3.0),),
                    "dba": (DBAConfig(k=5, alpha=0.0),)}
        assert steps_from_config(node) == expected[option]
    elif group == "dataset":
        assert build(node, "dataset") == DatasetConfig(root=str(tmp_path), csv="dataset.csv", cache_size=0)
    elif group == "paths":
        assert build(node, "paths") == PathsConfig(
            repo_root=str(REPO_ROOT), outputs_dir=str(tmp_path), run_dir=f"{tmp_path}/run",
            mlflow_uri=f"sqlite:///{tmp_path}/mlflow.db", mlartifacts=f"{tmp_path}/mlartifacts")
    else:
        assert OmegaConf.to_container(node, resolve=True)


def check_logger(lg, option: str, tmp_path: Path) -> None:
    """The built logger is the configured class with the YAML's settings (Lightning keeps some only privately)."""
    from pytorch_lightning.loggers import MLFlowLogger, NeptuneLogger, TensorBoardLogger

    if option == "mlflow":
        assert isinstance(lg, MLFlowLogger)
        expected_uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{tmp_path}/mlflow.db"
        assert (lg._experiment_name, lg._tracking_uri, lg._artifact_location) == (
            "metriclab", expected_uri, f"{tmp_path}/mlartifacts")
    elif option == "tensorboard":
        assert isinstance(lg, TensorBoardLogger)
        assert (lg.root_dir, lg.version, lg.log_dir) == (f"{tmp_path}/tensorboard", "", f"{tmp_path}/tensorboard/")
    elif option == "neptune":
        assert isinstance(lg, NeptuneLogger)
        assert lg._project_name == os.environ.get("NEPTUNE_PROJECT", "metriclab/metriclab")
        assert lg._neptune_run_kwargs == {"mode": os.environ.get("NEPTUNE_MODE", "async"), "source_files": [],
                                          "git_ref": False}
    else:
        raise AssertionError(f"configs/logger/{option}.yaml has no check here: add one")


@pytest.mark.parametrize("name", PRIMARY)
def test_primary_config_passes_the_entry_checks(tmp_path, name):
    """What the entry points check before any job (metriclab.jobs.checks), on every primary and experiment config."""
    (tmp_path / "dataset.csv").write_text("label,path,split,is_query,is_gallery\n")
    overrides = _base(tmp_path)
    if name == "predict":
        overrides += ["ckpt=null", f"images={tmp_path}"]
    check_config(compose_cfg(name, overrides))


def test_unknown_key_is_an_error_naming_it(tmp_path):
    cfg = compose_cfg("train", _base(tmp_path) + ["+optimizer.lrr=0.1"])
    with pytest.raises((ConfigError, TypeError), match="lrr"):
        build(cfg.optimizer, "optimizer")(params=[torch.nn.Parameter(torch.zeros(1))])
    cfg = compose_cfg("train", _base(tmp_path) + ["+extractor.archh=resnet18"])
    with pytest.raises(ConfigError, match="archh"):
        build_extractor(cfg.extractor)


def test_typo_on_command_line_is_rejected_by_hydra(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_cfg("train", _base(tmp_path) + ["trainer.max_epoch=3"])
