"""Extra validation sets: other datasets evaluated beside the main one, each under its own name (cross-dataset
evaluation: train on Market, test on Duke and MSMT17).

    python scripts/validate.py ckpt=... +extra_validation.duke=/data/duke +extra_validation.msmt17=/data/msmt17
    python scripts/train.py ... +extra_validation.duke=/data/duke metric_for_checkpointing=duke/mAP

A value is a dataset folder (its `dataset.csv`, OML's format) or `{root: <folder>, csv: <file name>}`; the set's
validation rows are its queries and gallery, read with the main dataset's validation transforms and checked by the
same contract (every row, before any run opens). Metrics are reported as `<name>/<metric>`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

from metriclab.core.errors import ConfigError
from metriclab.core.extra_validation import extra_validation_roots
from metriclab.data.datasets import ValidationData, build_validation_data, read_dataset_csv


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


__all__ = ["prefixed", "read_extra_validation"]
