"""The `extra_validation` mapping read as config (name -> `dataset` schema), shared by the data layer, which reads
the sets, and tracking, which records them as the run's dataset inputs (`metriclab.data.extra_validation`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

from omegaconf import DictConfig, OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError

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


__all__ = ["NAME", "extra_validation_roots"]
