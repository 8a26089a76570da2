"""One clean experiment-tracker run per job.

OML's pipelines create the MLflow run before anything can fail and never close it on an early error, so runs stay
RUNNING forever, all named alike. Here the run is opened by us, named `<config-name>-<timestamp>`, tagged, and always
closed: FINISHED on success, FAILED on any exception (config errors included), KILLED on Ctrl-C or SIGTERM.
PL's own `MLFlowLogger` is then attached to that run (`run_id=`), so Lightning logs into the same one.

The parts live next to this module: `tags` (what ran, git, versions), `mlflow_store` (create or resume the run,
params), `loggers` (the Lightning loggers, `TrackedRun`, images), `status` (FINISHED / FAILED / KILLED, SIGTERM).
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf

from metriclab.core.atomic import write_text_atomic
from metriclab.core.compat import mlflow_reset_tracking_uri
from metriclab.tracking.inputs import log_dataset_inputs
from metriclab.tracking.loggers import TrackedRun, finalize_loggers, log_hyperparameters, open_loggers
from metriclab.tracking.status import JobTerminated, RunStatus
from metriclab.tracking.study import trial_tags
from metriclab.tracking.tags import run_tags

log = logging.getLogger(__name__)

__all__ = ["JobTerminated", "TrackedRun", "close_run", "tracked_run", "write_config_artifacts"]


def write_config_artifacts(tracked: TrackedRun, cfg: DictConfig, overrides: Optional[List[str]]) -> None:
    """`config.yaml` (resolved) and `overrides.yaml` (the command line) in the run dir and under `config/`."""
    config_yaml = tracked.run_dir / "config.yaml"
    overrides_yaml = tracked.run_dir / "overrides.yaml"
    write_text_atomic(config_yaml, OmegaConf.to_yaml(cfg, resolve=True))
    write_text_atomic(overrides_yaml, OmegaConf.to_yaml(OmegaConf.create(list(overrides or []))))
    tracked.log_artifact(config_yaml, "config")
    tracked.log_artifact(overrides_yaml, "config")


def close_run(tracked: TrackedRun, status: str, env_uri: Optional[str]) -> None:
    """Set the MLflow run's final status, close the other loggers, and put the process-wide tracking URI back:
    PL's MLFlowLogger calls mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI for the whole process, so
    the next job in this process would read it instead of its own config."""
    if tracked.mlflow_client is not None:
        try:
            tracked.mlflow_client.set_terminated(tracked.mlflow_run_id, status)
        except Exception as e:  # never mask the job's own error with a tracker error
            log.error("could not set MLflow run %s to %s: %s", tracked.mlflow_run_id, status, e)
    finalize_loggers(tracked.loggers, status)
    mlflow_reset_tracking_uri(env_uri)


@contextlib.contextmanager
def tracked_run(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str,
    overrides: Optional[List[str]] = None,
    resume_run_id: Optional[str] = None,
    is_main_process: bool = True,
) -> Iterator[TrackedRun]:
    """Open the run, log tags/params/config, yield, and always close it with the right status. Only the main
    process (rank 0) opens loggers and writes the config files."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tags = {**run_tags(cfg, run_dir), **trial_tags()}  # a study's trial: nested under the study's parent run
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")  # put back by close_run
    tracked = TrackedRun([], run_dir, run_name)
    status = RunStatus()
    with status.sigterm_guard():
        try:
            with status.recorded():
                node = cfg.get("logger")
                if node is not None and is_main_process:
                    open_loggers(tracked, node, tags, resume_run_id)
                    if tracked.mlflow_client is not None and tracked.mlflow_run_id and not resume_run_id:
                        log_dataset_inputs(tracked.mlflow_client, tracked.mlflow_run_id, cfg)
                log_hyperparameters(tracked, cfg, resumed=bool(resume_run_id))
                if is_main_process:
                    write_config_artifacts(tracked, cfg, overrides)
                yield tracked
        finally:
            close_run(tracked, status.value, env_uri)
