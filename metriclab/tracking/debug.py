"""Debug runs (`debug=<name>`, configs/debug/) never look like results: they go to their own MLflow experiment
(`<logger.experiment_name><debug.experiment_suffix>`, `metriclab-debug` by default), carry the tag
`metriclab.debug=<name>` and are named `debug-<name>-<config>-<timestamp>`. Torch-free."""
from __future__ import annotations

import copy
from typing import Dict, Optional, Tuple

from omegaconf import DictConfig, open_dict

#: the tag naming the debug mode of a run (absent on real runs)
DEBUG_TAG = "metriclab.debug"


def debug_name(cfg: DictConfig) -> Optional[str]:
    """The debug mode of this config (`debug.name`), None for a real run."""
    node = cfg.get("debug")
    return str(node.get("name")) if isinstance(node, DictConfig) and node.get("name") else None


def debug_tags(cfg: DictConfig) -> Dict[str, str]:
    name = debug_name(cfg)
    return {DEBUG_TAG: name} if name else {}


def as_debug_run(cfg: DictConfig, run_name: str) -> Tuple[DictConfig, str]:
    """(config, run name) of the run to open: unchanged for a real run; for a debug run, a copy whose logger writes
    to the debug experiment (the logged config then says where the run is), and the run name prefixed."""
    name = debug_name(cfg)
    if name is None:
        return cfg, run_name
    suffix = str(cfg.debug.get("experiment_suffix") or "-debug")
    logger = cfg.get("logger")
    if logger is not None and logger.get("experiment_name"):
        experiment = str(logger.experiment_name)
        if not experiment.endswith(suffix):
            cfg = copy.deepcopy(cfg)
            with open_dict(cfg):
                cfg.logger.experiment_name = experiment + suffix
    prefix = f"debug-{name}-"
    return cfg, run_name if run_name.startswith(prefix) else prefix + run_name


__all__ = ["DEBUG_TAG", "as_debug_run", "debug_name", "debug_tags"]
