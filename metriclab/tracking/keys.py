"""Metric names as the tracker stores them. Torch-free: the report reads the names that the run writes."""
from __future__ import annotations


def mlflow_metric_key(key: str) -> str:
    """MLflow forbids '@' in metric names: `val/cmc@1` is logged as `val/cmc_at_1`."""
    return key.replace("@", "_at_")
