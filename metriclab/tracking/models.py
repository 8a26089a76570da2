"""An exported ONNX model logged to the MLflow run of the training that produced it (`mlflow.onnx.log_model`,
artifact name `model`), and optionally registered in the model registry.

The training run is finished by then: it is reopened only while the model is logged, with this process as its
owner (so another job's sweep of dead runs leaves it alone), and then put back exactly as it was: its status, its
end time and its owner tags. No checkpoint is uploaded.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from metriclab.core.compat import mlflow_reset_tracking_uri
from metriclab.core.errors import ConfigError
from metriclab.tracking.mlflow_store import mlflow_client
from metriclab.tracking.owner import owner_tags

log = logging.getLogger(__name__)

#: the artifact name of the logged model (`runs:/<run id>/model`, the LoggedModel's name)
MODEL_NAME = "model"


@dataclass
class LoggedOnnxModel:
    run_id: str
    model_uri: str
    model_id: Optional[str]
    registered_name: Optional[str] = None
    registered_version: Optional[str] = None


def onnx_signature(input_name: str, output_name: str, input_shape: tuple, embedding_size: int) -> Any:
    """Float32 NCHW images in (any batch), float32 embeddings out."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *input_shape), input_name)]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, embedding_size), output_name)]))


def _restore(client: Any, run_id: str, status: str, end_time: Optional[int], tags: Dict[str, Optional[str]]) -> None:
    client.set_terminated(run_id, status, end_time=end_time)
    for key, value in tags.items():
        if value is None:
            client.delete_tag(run_id, key)
        else:
            client.set_tag(run_id, key, value)


def log_onnx_model(uri: str, run_id: str, onnx_file: Path, contract: Dict[str, Any], input_example: np.ndarray,
                   register_as: Optional[str] = None) -> LoggedOnnxModel:
    """Log `onnx_file` to the run `run_id` of the store `uri` as an MLflow model (signature + `input_example`, a
    float32 NCHW batch of one preprocessed image), register it as `register_as` when given; the run's status, end
    time and owner tags are restored whatever happens. ConfigError when the store has no such run."""
    import mlflow
    import mlflow.onnx
    import onnx

    client = mlflow_client(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:  # MlflowException: no such run in this store
        raise ConfigError(f"the checkpoint's MLflow run {run_id} is not in the store {uri}") from e
    status, end_time = run.info.status, run.info.end_time
    mine = owner_tags()
    before = {key: run.data.tags.get(key) for key in mine}
    env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    for key, value in mine.items():  # before RUNNING: another job's sweep must see a live owner
        client.set_tag(run_id, key, value)
    signature = onnx_signature(contract["input_name"], contract["output_name"], (3, *contract["input_size"]),
                               int(contract["embedding_size"]))
    try:
        mlflow.set_tracking_uri(uri)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.onnx.log_model(onnx.load(str(onnx_file)), name=MODEL_NAME, signature=signature,
                                         input_example=input_example, save_as_external_data=False)
        logged = LoggedOnnxModel(run_id, info.model_uri, getattr(info, "model_id", None))
        if register_as:
            version = mlflow.register_model(info.model_uri, register_as)
            logged.registered_name, logged.registered_version = register_as, str(version.version)
    finally:
        try:
            _restore(client, run_id, status, end_time, before)
        finally:
            mlflow_reset_tracking_uri(env_uri)
    return logged


__all__ = ["LoggedOnnxModel", "MODEL_NAME", "log_onnx_model", "onnx_signature"]
