"""One clean experiment-tracker run per job.

OML's pipelines create the MLflow run before anything can fail and never close it on an early error, so runs stay
RUNNING forever, all named alike. Here the run is opened by us, named `<config-name>-<timestamp>`, tagged, and always
closed: FINISHED on success, FAILED on any exception (config errors included), KILLED on Ctrl-C or SIGTERM.
PL's own `MLFlowLogger` is then attached to that run (`run_id=`), so Lightning logs into the same one.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger

from metriclab.core.atomic import write_text_atomic
from metriclab.core.config import build, flatten
from metriclab.core.errors import ConfigError
from metriclab.tracking.keys import mlflow_metric_key
from metriclab.core.compat import mlflow_reset_tracking_uri, neptune_stop_run
from metriclab.core.paths import REPO_ROOT

log = logging.getLogger(__name__)

PACKAGES_TO_TAG = ("torch", "torchvision", "open-metric-learning", "pytorch-lightning", "mlflow", "hydra-core")


class JobTerminated(BaseException):
    """Raised from the SIGTERM handler so the job unwinds like on Ctrl-C and its run ends KILLED."""


def git_state() -> Dict[str, str]:
    def git(*args: str) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit or "unknown", "git_dirty": "unknown" if status is None else str(bool(status)).lower()}


def package_versions() -> Dict[str, str]:
    tags = {}
    for name in PACKAGES_TO_TAG:
        try:
            tags[f"version.{name}"] = version(name)
        except PackageNotFoundError:
            tags[f"version.{name}"] = "not installed"
    return tags


def _is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:", "/")) or "://" not in uri


@dataclass
class TrackedRun:
    """What a job logs through: the Lightning loggers, plus the MLflow run (when the logger is MLflow)."""

    loggers: List[Logger]
    run_dir: Path
    run_name: str
    mlflow_run_id: Optional[str] = None
    mlflow_client: Any = None
    #: resumed run: the last step already logged per metric, so a re-run epoch is not logged twice
    logged_until: Dict[str, int] = field(default_factory=dict)

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        """Log with step = epoch (Lightning would use the global step)."""
        for lg in self.loggers:
            if isinstance(lg, MLFlowLogger):
                fresh = {mlflow_metric_key(k): v for k, v in metrics.items()
                         if step > self.logged_until.get(mlflow_metric_key(k), -1)}
                if fresh:
                    lg.log_metrics(fresh, step=step)
            else:
                lg.log_metrics(metrics, step=step)

    def log_artifact(self, local_path: Path, artifact_dir: Optional[str] = None) -> None:
        """Send a file to the tracker (MLflow: artifact; TensorBoard/others: images as images)."""
        local_path = Path(local_path)
        if self.mlflow_client is not None:
            self.mlflow_client.log_artifact(self.mlflow_run_id, str(local_path), artifact_dir)
        for lg in self.loggers:
            if not isinstance(lg, MLFlowLogger) and local_path.suffix == ".png":
                _log_image_to_other_logger(lg, local_path, f"{artifact_dir or ''}/{local_path.stem}".strip("/"))


def _log_image_to_other_logger(lg: Logger, path: Path, tag: str) -> None:
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    experiment = lg.experiment
    if hasattr(experiment, "add_image"):  # TensorBoard's SummaryWriter
        experiment.add_image(tag, image, dataformats="HWC")
    elif hasattr(lg, "log_image"):  # loggers with their own image API (W&B)
        lg.log_image(key=tag, images=[image])
    else:  # Neptune: experiment is a run handler
        try:
            from neptune.types import File

            experiment[tag].append(File.as_image(image / 255.0))
        except Exception as e:  # a logger we do not know how to send images to: say so, do not fail the run
            log.warning("could not log image %s to %s: %s", path, type(lg).__name__, e)


def _create_mlflow_run(node: DictConfig, run_name: str, tags: Dict[str, str], resume_run_id: Optional[str]):
    from mlflow.tracking import MlflowClient

    uri = str(node.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI") or "")
    if not uri:
        raise ConfigError("`logger.tracking_uri` is empty: set it or MLFLOW_TRACKING_URI")
    client = MlflowClient(uri)
    if resume_run_id:
        run = client.get_run(resume_run_id)
        client.update_run(resume_run_id, status="RUNNING")
        return client, run.info.run_id
    exp_name = node.get("experiment_name") or "metriclab"
    exp = client.get_experiment_by_name(exp_name)
    if exp is None:
        artifact_location = node.get("artifact_location") if _is_local_store(uri) else None
        if artifact_location:
            artifact_location = Path(artifact_location).resolve().as_uri()
        exp_id = client.create_experiment(exp_name, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    run = client.create_run(exp_id, run_name=run_name, tags=tags)
    return client, run.info.run_id


def _log_params(client, run_id: str, cfg: DictConfig) -> None:
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    params = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flatten(cfg) if k]
    for i in range(0, len(params), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=params[i : i + MAX_PARAMS_TAGS_PER_BATCH])


class _SigtermGuard:
    """Turns SIGTERM into JobTerminated and remembers that it came: a signal that lands in a garbage-collector
    callback is swallowed by Python, and Lightning then stops with a plain SystemExit at the end of the epoch."""

    def __init__(self) -> None:
        self.received = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum, frame):  # noqa: ARG001
            self.received = True
            raise JobTerminated(f"received signal {signum}")

        try:
            previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread: leave signals alone
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def tracked_run(
    cfg: DictConfig,
    run_dir: Path,
    run_name: str,
    overrides: Optional[List[str]] = None,
    resume_run_id: Optional[str] = None,
    is_main_process: bool = True,
) -> Iterator[TrackedRun]:
    """Open the run, log tags/params/config, yield, and always close it with the right status."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    node = cfg.get("logger")
    tags = {
        "config_name": str(cfg.get("config_name", "unknown")),
        "task": str(cfg.get("task", "unknown")),
        "dataset": Path(str(cfg.dataset.root)).name if cfg.get("dataset") and cfg.dataset.get("root") else "none",
        "run_dir": str(run_dir),
        **git_state(),
        **package_versions(),
    }
    client, run_id = None, None
    status = "FAILED"
    # PL's MLFlowLogger calls mlflow.set_tracking_uri, which also sets MLFLOW_TRACKING_URI for the whole process:
    # put both back afterwards so the next job in this process reads its own config
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    sigterm = _SigtermGuard()
    with sigterm.installed():
        loggers: List[Logger] = []
        try:
            if node is not None and is_main_process:
                target = str(node.get("_target_", ""))
                if target.endswith("MLFlowLogger"):
                    client, run_id = _create_mlflow_run(node, run_name, tags, resume_run_id)
                    loggers.append(build(node, "logger", run_id=run_id))
                else:
                    loggers.append(build(node, "logger", save_dir=str(run_dir), name=run_name))
            tracked = TrackedRun(loggers, run_dir, run_name, run_id, client)
            if client is not None and resume_run_id:
                for key in client.get_run(run_id).data.metrics:
                    tracked.logged_until[key] = max(m.step for m in client.get_metric_history(run_id, key))
            if client is not None and not resume_run_id:
                _log_params(client, run_id, cfg)
            for lg in loggers:
                if not isinstance(lg, MLFlowLogger):
                    lg.log_hyperparams({k: str(v) for k, v in flatten(cfg) if k})
            if is_main_process:
                config_yaml = run_dir / "config.yaml"
                write_text_atomic(config_yaml, OmegaConf.to_yaml(cfg, resolve=True))
                write_text_atomic(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(list(overrides or []))))
                tracked.log_artifact(config_yaml, "config")
                tracked.log_artifact(run_dir / "overrides.yaml", "config")
            yield tracked
            status = "FINISHED"
            if sigterm.received:  # the signal was swallowed on the way: the job still did not complete
                status = "KILLED"
                raise SystemExit(128 + signal.SIGTERM)
        except (KeyboardInterrupt, JobTerminated):
            status = "KILLED"
            raise
        except SystemExit as e:  # Lightning turns Ctrl-C into sys.exit(1), SIGTERM into SIGTERMException
            status = "KILLED" if e.code not in (0, None) or sigterm.received else "FINISHED"
            if sigterm.received and e.code in (0, None):
                raise SystemExit(128 + signal.SIGTERM) from e
            raise
        finally:
            if client is not None:
                try:
                    client.set_terminated(run_id, status)
                except Exception as e:  # never mask the job's own error with a tracker error
                    log.error("could not set MLflow run %s to %s: %s", run_id, status, e)
            for lg in loggers:
                if not isinstance(lg, MLFlowLogger):
                    with contextlib.suppress(Exception):
                        lg.finalize("success" if status == "FINISHED" else "failed")
                    with contextlib.suppress(Exception):  # Neptune: stop the run with the job, not at exit
                        neptune_stop_run(lg)
            mlflow_reset_tracking_uri(env_uri)
