"""The Lightning logger(s) of a job and the handle jobs log through (`TrackedRun`).

MLflow is attached to the run metriclab opened (`run_id=`); any other logger (TensorBoard, Neptune, W&B) writes
under the run dir. MLflow gets the config as params and files as artifacts; the others get it as
hyper-parameters and the PNGs as images.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import Logger, MLFlowLogger, NeptuneLogger

from metriclab.core.compat import mlflow_logger_log_checkpoints, neptune_stop_run
from metriclab.core.config import build, flatten
from metriclab.tracking.keys import mlflow_metric_key
from metriclab.tracking.mlflow_store import last_logged_steps, log_params, open_mlflow_run
from metriclab.tracking.status import FINISHED

log = logging.getLogger(__name__)


class RunMLFlowLogger(MLFlowLogger):
    """PL's MLFlowLogger, except that `finalize` leaves the run's status alone. Lightning calls it at the end of every
    fit and validate, and PL's marks the run FINISHED there: a job killed after its first validation would show
    FINISHED. Only the run lifecycle (`tracking.run`) ends the run."""

    def finalize(self, status: str = "success") -> None:  # noqa: ARG002
        mlflow_logger_log_checkpoints(self)


#: the `_target_` of the MLflow logger: PL's own is replaced by it (`open_loggers`)
RUN_MLFLOW_LOGGER = f"{RunMLFlowLogger.__module__}.{RunMLFlowLogger.__qualname__}"


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
                log_image_to_other_logger(lg, local_path, f"{artifact_dir or ''}/{local_path.stem}".strip("/"))

    def log_step_image(self, local_path: Path, key: str, step: int) -> None:
        """A picture as an MLflow step image under `key` (the run page's image panel scrolls through the steps);
        the file itself goes through `log_artifact`. A failure is a warning: pictures never fail a job."""
        if self.mlflow_client is None:
            return
        try:
            import numpy as np
            from PIL import Image

            image = np.asarray(Image.open(local_path).convert("RGB"))
            self.mlflow_client.log_image(self.mlflow_run_id, image, key=key, step=int(step))
        except Exception as e:  # noqa: BLE001
            log.warning("could not log %s as MLflow image %s: %s", local_path, key, e)


def log_image_to_other_logger(lg: Logger, path: Path, tag: str) -> None:
    import numpy as np
    from PIL import Image

    image = np.asarray(Image.open(path).convert("RGB"))
    experiment = lg.experiment  # type: ignore[attr-defined]  # every concrete logger has one
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


def is_mlflow_node(node: DictConfig) -> bool:
    return str(node.get("_target_", "")).endswith("MLFlowLogger")


def run_owned_logger_node(node: DictConfig) -> DictConfig:
    """`node` with PL's MLFlowLogger as its target replaced by `RunMLFlowLogger` (a copy, resolved: the config
    itself, logged as params, keeps what the user wrote); any other target (a subclass of the user's) as it is."""
    try:
        target = get_object(str(node._target_))
    except Exception:  # `build` says which key cannot be imported
        return node
    if target is not MLFlowLogger:
        return node
    owned = OmegaConf.to_container(node, resolve=True)
    assert isinstance(owned, dict)  # a config group is a mapping
    return OmegaConf.create({**owned, "_target_": RUN_MLFLOW_LOGGER})


def open_loggers(tracked: TrackedRun, node: DictConfig, tags: Dict[str, str], resume_run_id: Optional[str]) -> None:
    """Build the `logger` group into `tracked`. The MLflow run is recorded in `tracked` as soon as it exists, so it
    is closed (FAILED) even when building the logger itself fails."""
    if not is_mlflow_node(node):
        tracked.loggers.append(build(node, "logger", save_dir=str(tracked.run_dir), name=tracked.run_name))
        return
    tracked.mlflow_client, tracked.mlflow_run_id = open_mlflow_run(node, tracked.run_name, tags, resume_run_id)
    tracked.loggers.append(build(run_owned_logger_node(node), "logger", run_id=tracked.mlflow_run_id))
    if resume_run_id:
        tracked.logged_until.update(last_logged_steps(tracked.mlflow_client, tracked.mlflow_run_id))


def log_hyperparameters(tracked: TrackedRun, cfg: DictConfig, resumed: bool) -> None:
    """The flattened config: MLflow params once per run (a resumed run has them), other loggers' hyper-parameters."""
    if tracked.mlflow_client is not None and tracked.mlflow_run_id is not None and not resumed:
        log_params(tracked.mlflow_client, tracked.mlflow_run_id, cfg)
    for lg in tracked.loggers:
        if not isinstance(lg, MLFlowLogger):
            lg.log_hyperparams({k: str(v) for k, v in flatten(cfg) if k})


def finalize_loggers(loggers: List[Logger], status: str) -> None:
    """Close the non-MLflow loggers (MLflow's run is closed by its client); a Neptune run stops with the job, not
    at interpreter exit. Never raises: the job's own error matters more."""
    for lg in loggers:
        if isinstance(lg, MLFlowLogger):
            continue
        with contextlib.suppress(Exception):
            lg.finalize("success" if status == FINISHED else "failed")
        if isinstance(lg, NeptuneLogger):
            try:
                neptune_stop_run(lg)
            except Exception as e:
                log.warning("could not stop the Neptune run: %s", e)
