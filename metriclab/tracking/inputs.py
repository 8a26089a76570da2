"""What a run read, as MLflow dataset inputs: the UI's Dataset column and each run's "Datasets used" list.

One input per dataset CSV: its name (the dataset folder), a digest of the CSV's bytes (so two runs on different
versions of a dataset are told apart), its path as the source, and the context it was used in (`train` for a
training run's dataset, `validation` for validate.py's and for extra validation sets).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, List, Tuple

from omegaconf import DictConfig

from metriclab.core.extra_validation import extra_validation_roots

log = logging.getLogger(__name__)

#: MLflow's tag on a dataset input saying how the run used it
CONTEXT_TAG = "mlflow.data.context"
#: hex characters of the CSV's sha256 kept as the digest (MLflow shows short digests)
DIGEST_CHARS = 10


def csv_digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()[:DIGEST_CHARS]


def dataset_csvs(cfg: DictConfig) -> List[Tuple[str, Path, str]]:
    """(name, CSV path, context) of every dataset the job reads that exists on disk."""
    out = []
    dataset = cfg.get("dataset")
    if dataset is not None and dataset.get("root"):
        context = "train" if cfg.get("task") == "train" else "validation"
        out.append((Path(str(dataset.root)).name, Path(str(dataset.root)) / str(dataset.get("csv", "dataset.csv")),
                    context))
    for name, extra in extra_validation_roots(cfg.get("extra_validation")).items():
        out.append((name, Path(extra.root) / extra.csv, "validation"))
    return [(name, path, context) for name, path, context in out if path.is_file()]


def log_dataset_inputs(client: Any, run_id: str, cfg: DictConfig) -> None:
    """Record the job's datasets on the run (a failure is logged, never raised: the inputs are a convenience)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    try:
        inputs = [DatasetInput(Dataset(name=name, digest=csv_digest(path), source_type="local",
                                       source=json.dumps({"uri": str(path.resolve())})),
                               tags=[InputTag(CONTEXT_TAG, context)])
                  for name, path, context in dataset_csvs(cfg)]
        if inputs:
            client.log_inputs(run_id, datasets=inputs)
    except Exception as e:  # noqa: BLE001  (the run goes on without its dataset inputs)
        log.warning("could not record the dataset inputs of run %s: %s", run_id, e)


__all__ = ["CONTEXT_TAG", "csv_digest", "dataset_csvs", "log_dataset_inputs"]
