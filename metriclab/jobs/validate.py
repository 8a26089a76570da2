"""`validate(cfg)`: metrics of a model on the validation rows (query vs gallery), one tracked run.

    python scripts/validate.py                         # the newest training run's best.ckpt, on its own dataset
    python scripts/validate.py run=<run dir or MLflow run id>
    python scripts/validate.py ckpt=<checkpoint> dataset.root=<dataset> transforms=<the training group>

What is evaluated, in order of precedence:
- `embeddings=<file.npz>`: precomputed embeddings (`embeddings` float32 N x D, `paths` = the CSV's validation rows);
- `ckpt=<file>`: one of our training checkpoints (its extractor architecture is stored in it) or an extractor
  state dict for the configured `extractor`;
- neither: the configured `extractor` with its own weights (a zoo key, a local path, or null = random init).
An evaluation-only path: the images are embedded by metriclab.inference.embed (in the training run's precision),
scored by metriclab.evaluation and published by metriclab.training.publish; no Lightning.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from metriclab.core.atomic import atomic_write
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import ValidationData, build_validation_data, read_dataset_csv
from metriclab.data.embeddings_file import check_embeddings_array, read_npz_array
from metriclab.data.extra_validation import prefixed, read_extra_validation
from metriclab.evaluation.pictures import format_metrics_table
from metriclab.evaluation.postprocess import check_sizes, describe, steps_from_config
from metriclab.evaluation.validation import evaluate_validation
from metriclab.inference.embed import embed_all
from metriclab.inference.model import load_extractor
from metriclab.inference.onnx_model import with_model_contract
from metriclab.jobs.runs import resolve_run
from metriclab.tracking.links import tracked_run_link
from metriclab.tracking.run import tracked_run
from metriclab.training.publish import publish_validation


def load_embeddings_npz(path: str | Path, data: ValidationData) -> torch.Tensor:
    """Embeddings from an .npz, reordered to the validation rows; every row must be there exactly once."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"embeddings={path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:
        raise ConfigError(f"embeddings={path} is not a readable .npz file: {e}") from e
    for key in ("embeddings", "paths"):
        if key not in npz.files:
            raise ConfigError(f"{path}: missing array `{key}` (found {npz.files}); expected `embeddings` (N x D "
                              f"float32) and `paths` (the CSV's validation paths), as written by "
                              f"export_embeddings=true")
    # object/string/bool arrays, NaN/inf and float64 beyond float32 are one clear line each, never a silent cast
    emb = check_embeddings_array(read_npz_array(npz, "embeddings", path), path)
    paths = read_npz_array(npz, "paths", path).astype(str)
    if emb.ndim != 2 or len(emb) != len(paths):
        raise ConfigError(f"{path}: `embeddings` must be N x D with N = len(paths) = {len(paths)}, got {emb.shape}")
    position = {p: i for i, p in enumerate(paths)}
    if len(position) != len(paths):
        raise ConfigError(f"{path}: `paths` has duplicates")
    missing = [p for p in data.paths if p not in position]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} validation rows of the CSV have no embedding, e.g. {missing[:3]}")
    return torch.from_numpy(emb[[position[p] for p in data.paths]])


def save_embeddings_npz(path: Path, embeddings: torch.Tensor, data: ValidationData) -> None:
    atomic_write(path, lambda tmp: np.savez(tmp, embeddings=embeddings.numpy().astype(np.float32),
                                            paths=data.paths.astype(str), labels=data.labels), ".npz")


def seed_everything(seed: Any) -> None:
    """Python, numpy and torch seeded alike (a random-init extractor is then the same every time)."""
    if seed is None:
        return
    random.seed(int(seed))
    np.random.seed(int(seed))
    torch.manual_seed(int(seed))


@dataclass
class ValidationInputs:
    """What validate reads, all checked before a tracked run is opened (a usage error opens none)."""

    data: ValidationData
    embeddings_file: Optional[Path] = None
    ckpt: Optional[Path] = None
    extra: Dict[str, ValidationData] = field(default_factory=dict)  # extra validation sets, by name


def read_inputs(cfg: DictConfig) -> ValidationInputs:
    """The validation rows (the CSV and its images checked), and the embeddings file or checkpoint that exists."""
    dataset = build(cfg.dataset, "dataset")
    root = Path(dataset.root)
    df = read_dataset_csv(root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
    transform = build(cfg.transforms.val, "transforms.val")
    data = build_validation_data(df, root, transform, dataset.cache_size, on_bad_image=dataset.on_bad_image)
    extra = read_extra_validation(cfg.get("extra_validation"), transform)
    if cfg.get("embeddings"):
        path = Path(cfg.embeddings)
        if not path.is_file():
            raise ConfigError(f"embeddings={path} does not exist")
        if extra:
            raise ConfigError(f"extra_validation ({', '.join(extra)}) needs a model to embed its images: use ckpt= "
                              f"(or the extractor), not embeddings=")
        return ValidationInputs(data, embeddings_file=path)
    ckpt = Path(cfg.ckpt) if cfg.get("ckpt") else None
    if ckpt is not None and not ckpt.is_file():
        raise ConfigError(f"checkpoint {ckpt} does not exist: pass ckpt=<best.ckpt or last.ckpt of a training run>")
    return ValidationInputs(data, ckpt=ckpt, extra=extra)


def embed_rows(cfg: DictConfig, extractor: Any, data: ValidationData, what: str, flip_tta: bool) -> torch.Tensor:
    """The embeddings of `data`'s rows (row order) by the loaded `extractor` (`flip_tta`: with the mirror images)."""
    emb = embed_all(extractor.model, data.dataset, [str(data.root / p) for p in data.paths], what,
                    int(cfg.batch_size_val), int(cfg.num_workers), extractor.precision, flip_tta=flip_tta)
    return torch.from_numpy(emb)


def embed_validation_rows(cfg: DictConfig, inputs: ValidationInputs,
                          extractor: Any = None) -> Tuple[torch.Tensor, int, str]:
    """(embeddings in row order, the epoch to publish under, what was evaluated) for the configured source
    (`extractor`: one already loaded, else it is loaded here)."""
    if inputs.embeddings_file is not None:
        return load_embeddings_npz(inputs.embeddings_file, inputs.data), 0, f"embeddings {cfg.embeddings}"
    extractor = extractor or load_extractor(cfg)
    flip_tta = build(cfg.evaluation, "evaluation").flip_tta
    emb = embed_rows(cfg, extractor, inputs.data, "validation", flip_tta)
    source = (f"model {cfg.model}" if cfg.get("model") else f"ckpt {cfg.ckpt}" if cfg.get("ckpt")
              else f"weights {extractor.constructor_cfg.get('weights')}")
    return emb, extractor.epoch, source + (", flip TTA" if flip_tta else "")


def validate(cfg: DictConfig) -> Dict[str, Any]:
    """Evaluate and log; returns run dir, metrics, tracker run id, run name and the embeddings."""
    run_dir, run_name, overrides = job_identity(cfg)
    cfg = resolve_run(cfg, overrides)
    if cfg.get("model"):  # an exported ONNX model: its contract's val transform
        cfg = with_model_contract(cfg)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    seed_everything(cfg.get("seed"))
    evaluation = build(cfg.evaluation, "evaluation")  # EvaluationConfig: a misspelt key fails before the run
    target_fmr = build(cfg.get("calibration"), "calibration").target_fmr  # its threshold is reported and drawn
    postprocess = steps_from_config(cfg.get("postprocess"))
    inputs = read_inputs(cfg)
    check_sizes(postprocess, int(inputs.data.is_query.sum()), int(inputs.data.is_gallery.sum()))
    for data in inputs.extra.values():
        check_sizes(postprocess, int(data.is_query.sum()), int(data.is_gallery.sum()))
    with tracked_run(cfg, run_dir, run_name, overrides) as tracked:
        extractor = load_extractor(cfg) if inputs.embeddings_file is None else None
        embeddings, epoch, source = embed_validation_rows(cfg, inputs, extractor)
        report = evaluate_validation(embeddings, inputs.data, evaluation, postprocess, target_fmr)
        for name, data in inputs.extra.items():  # cross-dataset: each set under its name
            extra_emb = embed_rows(cfg, extractor, data, f"extra_validation.{name}", evaluation.flip_tta)
            report.metrics.update(prefixed(name, evaluate_validation(extra_emb, data, evaluation, postprocess,
                                                                          target_fmr).metrics))
        publish_validation(report, embeddings, inputs.data, evaluation, tracked, run_dir, epoch=epoch,
                           target_fmr=target_fmr)
        metrics = {k: float(v) for k, v in report.metrics.items()}
        if cfg.get("export_embeddings"):
            save_embeddings_npz(run_dir / "embeddings.npz", embeddings, inputs.data)
        after = "" if not postprocess else f", post-processing {describe(postprocess)}"
        link = tracked_run_link(tracked)
        print(f"\n{run_name} on {cfg.dataset.root} ({source}{after}):\n{format_metrics_table(metrics)}\n"
              f"run dir: {run_dir}" + (f"\nMLflow run: {link}" if link else ""))
        tracked.log_artifact(run_dir / "metrics.json")
        return {"run_dir": run_dir, "metrics": metrics, "mlflow_run_id": tracked.mlflow_run_id, "run_name": run_name,
                "embeddings": embeddings}


__all__ = ["load_embeddings_npz", "save_embeddings_npz", "validate"]
