"""Metric names as the tracker stores them, and which store to read. Torch-free: the report and `make worst` read
what the run writes."""
from __future__ import annotations

import os

from metriclab.core.constants import DEFAULT_MLFLOW_URI


def mlflow_metric_key(key: str) -> str:
    """MLflow forbids '@' in metric names: `val/cmc@1` is logged as `val/cmc_at_1`."""
    return key.replace("@", "_at_")


def default_tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI when set (and not empty), else the embedded store (the logger config's own rule)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_MLFLOW_URI
