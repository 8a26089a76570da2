"""Extra validation sets: other datasets evaluated beside the main one, each under its own name (cross-dataset
evaluation: train on Market, test on Duke and MSMT17).

    python scripts/validate.py ckpt=... +extra_validation.duke=/data/duke +extra_validation.msmt17=/data/msmt17
    python scripts/train.py ... +extra_validation.duke=/data/duke metric_for_checkpointing=duke/mAP

A value is a dataset folder (its `dataset.csv`, OML's format) or `{root: <folder>, csv: <file name>}`; the set's
validation rows are its queries and gallery, read with the main dataset's validation transforms and checked by the
same contract (every row, before any run opens). Metrics are reported as `<name>/<metric>`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import ValidationData, build_validation_data, read_dataset_csv

#: a set's name becomes a metric prefix (`duke/mAP`) and an MLflow key: letters, digits, `_`, `-`
NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def extra_validation_roots(node: Any) -> Dict[str, Any]:
    """name -> its `dataset` config (built: DatasetConfig) from the `extra_validation` mapping; a bad name or value
    is a ConfigError naming the key."""
    if node is None:
        return {}
    if not isinstance(node, (DictConfig, dict)):
        raise ConfigError(f"`extra_validation` must map names to dataset folders "
                          f"(+extra_validation.duke=/data/duke), got {node!r}")
    out = {}
    for key, value in node.items():
        name = str(key)
        if not NAME.match(name):
            raise ConfigError(f"`extra_validation.{name}`: a set's name may hold only letters, digits, `_` and `-` "
                              f"(it prefixes its metrics: {name}/mAP)")
        if isinstance(value, (str, Path)):
            value = {"root": str(value)}
        elif value is None or not isinstance(value, (DictConfig, dict)):
            raise ConfigError(f"`extra_validation.{name}` must be a dataset folder or {{root: ..., csv: ...}}, "
                              f"got {value!r}")
        out[name] = build(OmegaConf.create(dict(value)), "dataset")
    return out


def read_extra_validation(node: Any, transform: Any) -> Dict[str, ValidationData]:
    """Every extra set's validation rows (CSV and images checked), in the order the config names them."""
    sets = {}
    for name, dataset in extra_validation_roots(node).items():
        root = Path(dataset.root)
        if not root.is_dir():
            raise ConfigError(f"`extra_validation.{name}={root}`: the folder does not exist")
        df = read_dataset_csv(root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
        sets[name] = build_validation_data(df, root, transform, dataset.cache_size, on_bad_image=dataset.on_bad_image)
    return sets


def prefixed(name: str, metrics: Dict[str, float]) -> Dict[str, float]:
    return {f"{name}/{k}": v for k, v in metrics.items()}


__all__ = ["NAME", "extra_validation_roots", "prefixed", "read_extra_validation"]
