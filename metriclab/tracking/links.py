"""The MLflow UI address of a run, printed when a job ends.

A server URI (`http(s)://...`) is the UI itself; a local store (sqlite, a folder) is what `make ui` serves at
http://127.0.0.1:5000. Every link carries `?workflowType=machine_learning`: MLflow 3 otherwise opens its GenAI view.
"""
from __future__ import annotations

from typing import Any, Optional

#: where `make ui` serves a local store
LOCAL_UI = "http://127.0.0.1:5000"
#: MLflow 3's UI query parameter for the model-training view (runs table, metrics)
WORKFLOW = "workflowType=machine_learning"


def ui_base(tracking_uri: str) -> str:
    uri = str(tracking_uri)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI


def run_link(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{ui_base(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW}"


def tracked_run_link(tracked: Any) -> Optional[str]:
    """The UI link of a TrackedRun's MLflow run, or None (no MLflow logger, or the store cannot be read)."""
    client, run_id = getattr(tracked, "mlflow_client", None), getattr(tracked, "mlflow_run_id", None)
    if client is None or not run_id:
        return None
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
    except Exception:  # noqa: BLE001  (a link is a convenience)
        return None
    hint = "" if str(client.tracking_uri).startswith(("http://", "https://")) else "   (make ui)"
    return run_link(client.tracking_uri, experiment_id, run_id) + hint


__all__ = ["LOCAL_UI", "WORKFLOW", "run_link", "tracked_run_link", "ui_base"]
