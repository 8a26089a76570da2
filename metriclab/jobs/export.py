"""`export(cfg)`: a training checkpoint as an ONNX model with its preprocessing contract, checked against PyTorch.

    python scripts/export.py ckpt=outputs/train/<timestamp>/checkpoints/best.ckpt
    python scripts/export.py run=<run dir or MLflow run id> [register_as=<registered model name>]

Writes `<training run dir>/export/model.onnx` (dynamic batch axis) and `model.json` (the contract, also stored as the
ONNX file's metadata_props), after a parity check on the validation rows of the run's dataset (metriclab.inference
.export: a failure is one error line and writes nothing). The checkpoint's run is found like validate's `run=`:
a checkpoint names its training run (`CheckpointMeta.run_dir`), whose dataset, transforms, evaluation and extractor
are used; a bare state dict needs them on the command line and exports into this job's own run dir. The model is
logged to the training run in MLflow as `model` (metriclab.tracking.models); no run of its own is opened.

Module level is torch-free: `export_config` runs in the entry script before the config checks.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf, open_dict

from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.jobs.runs import already_resolved, resolve_run


def export_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The job config with the checkpoint's training run filled in (as validate's `run=` does): `run=` itself, the
    run a `ckpt=` names in its metadata, or with neither the newest training run. A checkpoint without a run
    (a state dict) leaves `cfg` as it is (dataset.root, transforms and extractor then come from the command line)."""
    if already_resolved(cfg):  # the entry filled it in already (the job is also called directly, by tests)
        return cfg
    if cfg.get("run") or not cfg.get("ckpt"):
        return resolve_run(cfg, overrides)
    from metriclab.inference.export import checkpoint_run_dir  # reads the checkpoint: torch

    run_dir = checkpoint_run_dir(cfg.ckpt)
    if run_dir is None:
        return resolve_run(cfg, overrides)
    named = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    assert isinstance(named, DictConfig)
    with open_dict(named):
        named.run = str(run_dir)
    return resolve_run(named, overrides)


def tracking_uri(cfg: DictConfig) -> Optional[str]:
    """The MLflow store of the `logger` group (as the other jobs open it), else MLFLOW_TRACKING_URI."""
    uri = OmegaConf.select(cfg, "logger.tracking_uri", default=None, throw_on_missing=False)
    return str(uri) if uri else os.environ.get("MLFLOW_TRACKING_URI")


def log_to_training_run(cfg: DictConfig, result: Dict[str, Any]) -> Optional[Any]:
    """The exported model logged to the checkpoint's MLflow run (and registered with `register_as=`); one line
    saying why when it is not."""
    from metriclab.tracking.models import log_onnx_model

    run_id, register_as = result.get("mlflow_run_id"), cfg.get("register_as")
    uri = tracking_uri(cfg)
    reason = ("the checkpoint names no MLflow run (a state dict, or trained without logger=mlflow)" if not run_id
              else "log_model=false" if not cfg.get("log_model", True)
              else "no MLflow store: use logger=mlflow or set MLFLOW_TRACKING_URI" if not uri else None)
    if reason is not None:
        if register_as:
            raise ConfigError(f"register_as={register_as}: the model cannot be registered: {reason}")
        print(f"MLflow: model not logged: {reason}")
        return None
    assert uri is not None and run_id is not None
    try:
        logged = log_onnx_model(uri, str(run_id), result["model"], result, result["example"], register_as)
    except ConfigError as e:
        if register_as:
            raise
        print(f"MLflow: model not logged: {e}")
        return None
    registered = (f"; registered as {logged.registered_name} version {logged.registered_version}"
                  if logged.registered_name else "")
    print(f"MLflow: logged to training run {run_id} as `model` ({logged.model_uri}){registered}")
    return logged


def export(cfg: DictConfig) -> Dict[str, Any]:
    """Export, check, write and log; returns the contract (model.json's keys) with `model`, `contract`, `logged`."""
    import torch

    from metriclab.core.checkpoint import CheckpointMeta
    from metriclab.inference.export import ExportSource, export_checked, parity_lines, size_mb
    from metriclab.inference.model import warn_if_transforms_differ
    from metriclab.models.extractors import build_extractor_for_inference, extractor_constructor_cfg

    run_dir, _, overrides = job_identity(cfg)
    cfg = export_config(cfg, overrides)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    if not cfg.get("ckpt"):
        raise ConfigError("nothing to export: pass ckpt=<best.ckpt of a training run> or run=<run folder or MLflow "
                          "run id>")
    model, loaded, extractor_cfg = build_extractor_for_inference(cfg.extractor, cfg.ckpt,
                                                                 cfg.get("extractor_from_ckpt", True))
    meta = CheckpointMeta.from_checkpoint(loaded)
    warn_if_transforms_differ(cfg, meta)
    constructor = OmegaConf.to_container(extractor_constructor_cfg(extractor_cfg), resolve=True)
    assert isinstance(constructor, dict)
    source = ExportSource(model.eval(), {str(k): v for k, v in constructor.items()}, Path(cfg.ckpt).resolve(), meta,
                          int(loaded.get("epoch", 0)), build(cfg.evaluation, "evaluation").flip_tta)
    home = Path(meta.run_dir) if meta.run_dir and Path(meta.run_dir).is_dir() else run_dir
    out_dir = Path(cfg.export_dir) if cfg.get("export_dir") else home / "export"
    print(f"export: ckpt {source.ckpt} (epoch {source.epoch}, training run {meta.run_dir or 'unknown'})", flush=True)
    result = export_checked(cfg, source, build(cfg.transforms.val, "transforms.val"), out_dir)
    size = result["input_size"]
    print(f"parity, onnxruntime (CPU) vs PyTorch fp32 on validation images of {result['parity']['images_from']}:\n"
          + "\n".join(parity_lines(result["parity"]))
          + f"\nmodel: {result['model']} ({size_mb(result['model'])} MB, opset {result['opset']}, input N x 3 x "
          f"{size[0]} x {size[1]} float32 NCHW RGB, dynamic batch; embeddings {result['embedding_size']}-d, unit "
          f"length: {result['normalised']}, flip TTA in graph: {result['flip_tta_in_graph']})\n"
          f"contract: {result['contract']}", flush=True)
    result["logged"] = log_to_training_run(cfg, result)
    return result


__all__ = ["export", "export_config", "log_to_training_run", "tracking_uri"]
