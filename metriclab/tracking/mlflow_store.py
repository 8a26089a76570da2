"""The MLflow run itself, opened by metriclab rather than by OML or Lightning: created in its experiment (with the
artifact location of a local store) under our run name and tags, or resumed; then PL's `MLFlowLogger` is attached
to it by run id. Parameters are the flattened config, logged once per run. Opening a run first sweeps the runs
whose owner process is gone (`owner`); the first client on a sqlite store is made under a file lock, since MLflow
creating the tables from two processes at once fails in one of them."""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from omegaconf import DictConfig

from metriclab.core.config import flatten
from metriclab.core.errors import ConfigError
from metriclab.tracking.owner import KILLED_REASON, owner_tags, sweep_dead_runs

DEFAULT_EXPERIMENT = "metriclab"
#: MLflow 3's UI opens an experiment on its GenAI view (traces) unless the experiment says it is model training
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def is_local_store(uri: str) -> bool:
    """A store on this machine (sqlite, file, a path): only there does metriclab choose the artifact location; a
    server stores artifacts where it was told to."""
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


def sqlite_path(uri: str) -> Optional[Path]:
    """The database file of a `sqlite:///<path>` URI (None for any other store, or an in-memory one)."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    return Path(uri[len("sqlite:///"):].split("?", 1)[0])


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """An exclusive lock on `<db>.lock` beside a sqlite store (nothing for other stores): while held, no other
    metriclab process creates or migrates the same database."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{db}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed, also if this process dies
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def mlflow_client(uri: str) -> Any:
    """An MlflowClient whose store exists: created (tables and migrations) under `store_lock`, so two jobs starting
    at once on a fresh store both succeed."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)  # the store is made on first use: make it while locked
    return client


def open_mlflow_run(node: DictConfig, run_name: str, tags: Dict[str, str],
                    resume_run_id: Optional[str]) -> Tuple[Any, str]:
    """(MlflowClient, run id) of a new RUNNING run, or of `resume_run_id` set back to RUNNING; either one is tagged
    with this process as its owner, and the runs of dead owners are swept first."""
    uri = str(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "")
    if not uri:
        raise ConfigError("`logger.tracking_uri` is empty: set it or MLFLOW_TRACKING_URI")
    client = mlflow_client(uri)
    sweep_dead_runs(client, keep_run_ids=[resume_run_id])
    if resume_run_id:
        run = client.get_run(resume_run_id)
        for key, value in owner_tags().items():  # before RUNNING: another job's sweep must see the new owner
            client.set_tag(resume_run_id, key, value)
        if KILLED_REASON in run.data.tags:  # the reason of an earlier end no longer applies
            client.delete_tag(resume_run_id, KILLED_REASON)
        client.update_run(resume_run_id, status="RUNNING")
        return client, run.info.run_id
    run = client.create_run(experiment_id(client, uri, node), run_name=run_name, tags={**tags, **owner_tags()})
    return client, run.info.run_id


def experiment_id(client: Any, uri: str, node: DictConfig) -> str:
    """The id of the logger's experiment, created when missing (under `store_lock`: two jobs starting at once would
    both create it, and one would fail)."""
    exp_name = node.get("experiment_name") or DEFAULT_EXPERIMENT
    with store_lock(uri):
        exp = client.get_experiment_by_name(exp_name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version or by hand
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return str(exp.experiment_id)
        artifact_location = node.get("artifact_location") if is_local_store(uri) else None
        if artifact_location:
            artifact_location = Path(artifact_location).resolve().as_uri()
        return str(client.create_experiment(exp_name, artifact_location=artifact_location,
                                            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))


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
