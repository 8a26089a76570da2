"""Every primary config and every group option composes, and every component instantiates."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.models.extractors import build_extractor
from metriclab.core.paths import CONFIGS_DIR
from tests.helpers import compose_cfg

GROUPS = ["dataset", "extractor", "criterion", "sampler", "optimizer", "scheduler", "transforms", "evaluation",
          "logger", "trainer", "paths"]
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
        assert container["logger"]["tracking_uri"].startswith("sqlite:///") or "MLFLOW_TRACKING_URI" in __import__("os").environ


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_instantiates(tmp_path, group, option):
    overrides = _base(tmp_path) + [f"{group}={option}"]
    cfg = compose_cfg("train", overrides)
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
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
        sched = build(node, "scheduler")(optimizer=opt)
        assert hasattr(sched, "step")
    elif group == "transforms":
        import numpy as np

        for part in ("train", "val"):
            tf = build(node[part], f"transforms.{part}")
            img = np.random.default_rng(0).integers(0, 255, (300, 200, 3), dtype=np.uint8)
            out = tf(image=img)["image"] if hasattr(tf, "processors") or type(tf).__module__.startswith("albu") \
                else tf(__import__("PIL.Image", fromlist=["Image"]).fromarray(img))
            assert out.ndim == 3 and out.shape[0] == 3
    elif group == "logger":
        lg = build(node, "logger", **({"save_dir": str(tmp_path)} if "TensorBoard" in node._target_ else {}))
        assert lg is not None
    elif group == "trainer":
        if node.accelerator == "gpu" and not torch.cuda.is_available():
            pytest.skip("no GPU on this machine: composition is checked, instantiation is not")
        assert build(node, "trainer", logger=False).max_epochs == node.max_epochs
    elif group == "evaluation":
        assert node.distance in {"euclidean", "cosine"}
    else:
        assert OmegaConf.to_container(node, resolve=True)


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
