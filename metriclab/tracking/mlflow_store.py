"""The MLflow run itself, opened by metriclab rather than by OML or Lightning: created in its experiment (with the
artifact location of a local store) under our run name and tags, or resumed; then PL's `MLFlowLogger` is attached
to it by run id. Parameters are the flattened config, logged once per run."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from omegaconf import DictConfig

from metriclab.core.config import flatten
from metriclab.core.errors import ConfigError

DEFAULT_EXPERIMENT = "metriclab"


def is_local_store(uri: str) -> bool:
    """A store on this machine (sqlite, file, a path): only there does metriclab choose the artifact location; a
    server stores artifacts where it was told to."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def open_mlflow_run(node: DictConfig, run_name: str, tags: Dict[str, str],
                    resume_run_id: Optional[str]) -> Tuple[Any, str]:
    """(MlflowClient, run id) of a new RUNNING run, or of `resume_run_id` set back to RUNNING."""
    from mlflow.tracking import MlflowClient

    uri = str(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "")
    if not uri:
        raise ConfigError("`logger.tracking_uri` is empty: set it or MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    if resume_run_id:
        run = client.get_run(resume_run_id)
        client.update_run(resume_run_id, status="RUNNING")
        return client, run.info.run_id
    exp_name = node.get("experiment_name") or DEFAULT_EXPERIMENT
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        artifact_location = node.get("artifact_location") if is_local_store(uri) else None
        if artifact_location:
            artifact_location = Path(artifact_location).resolve().as_uri()
        exp_id = client.create_experiment(exp_name, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    return client, run.info.run_id


def log_params(client: Any, run_id: str, cfg: DictConfig) -> None:
    """The flattened config as MLflow params (values cut to MLflow's length limit, in batches it accepts)."""
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(cfg) if k]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])


def last_logged_steps(client: Any, run_id: str) -> Dict[str, int]:
    """Metric key -> the last step a (resumed) run already has, so a re-run epoch is not logged twice."""
    return {key: max(m.step for m in client.get_metric_history(run_id, key))
            for key in client.get_run(run_id).data.metrics}
