"""The model an inference job runs: a checkpoint (or the configured extractor's own weights) on a device, with
what the training run recorded about it (its config: transforms and precision); or an exported ONNX model
(`model=<model.onnx>`, run by onnxruntime: metriclab.inference.onnx_model)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.paths import contract_path
from metriclab.inference.embed import DEFAULT_PRECISION, check_precision, resolve_device
from metriclab.inference.onnx_model import load_onnx_extractor
from metriclab.inference.search_index import file_sha256
from metriclab.models.extractors import build_extractor_for_inference, extractor_constructor_cfg

log = logging.getLogger(__name__)


@dataclass
class LoadedExtractor:
    model: torch.nn.Module
    constructor_cfg: Dict[Any, Any]
    checkpoint: Optional[Path]
    meta: CheckpointMeta
    #: the `trainer.precision` the embeddings are computed in
    precision: str = DEFAULT_PRECISION
    #: the checkpoint's epoch (Lightning's `epoch` key), 0 without a checkpoint
    epoch: int = 0
    #: the ONNX file `model` runs (`model=`), None for a PyTorch extractor
    onnx_model: Optional[Path] = None

    def key_parts(self) -> Dict[str, Any]:
        """What identifies the embeddings this model gives (the gallery cache key)."""
        parts: Dict[str, Any] = {"extractor": self.constructor_cfg}
        weights = self.constructor_cfg.get("weights")
        if self.onnx_model is not None:
            parts["onnx_sha256"] = file_sha256(self.onnx_model)
        elif self.checkpoint is not None:
            parts["checkpoint_sha256"] = file_sha256(self.checkpoint)
        elif isinstance(weights, str) and Path(weights).is_file():  # a weights file can be overwritten in place
            parts["weights_sha256"] = file_sha256(Path(weights))
        if check_precision(self.precision) != DEFAULT_PRECISION:  # fp32 keys stay what they were before precisions
            parts["precision"] = self.precision
        return parts


def training_run_config(meta: CheckpointMeta) -> Optional[DictConfig]:
    """The config.yaml of the run that wrote the checkpoint (None when unknown or unreadable)."""
    config_yaml = Path(meta.run_dir) / "config.yaml" if meta.run_dir else None
    if config_yaml is None or not config_yaml.is_file():
        return None
    try:
        loaded = OmegaConf.load(config_yaml)
    except Exception as e:  # an unreadable training config only costs what we would have read from it
        log.warning("cannot read the training run's config %s: %s", config_yaml, e)
        return None
    return loaded if isinstance(loaded, DictConfig) else None


def run_precision(cfg: DictConfig, meta: CheckpointMeta) -> str:
    """`cfg.precision` when set, else the training run's `trainer.precision`, else fp32."""
    if cfg.get("precision") is not None:
        return check_precision(cfg.precision)
    run_cfg = training_run_config(meta)
    trainer = run_cfg.get("trainer") if run_cfg is not None else None
    found = trainer.get("precision") if isinstance(trainer, DictConfig) else None
    return check_precision(found)


def load_onnx(cfg: DictConfig) -> LoadedExtractor:
    """`cfg.model`: an exported ONNX model on onnxruntime (fp32; the architecture is the contract's `extractor`)."""
    path = Path(cfg.model).resolve()
    model = load_onnx_extractor(path, cfg.get("device", "auto"))
    ckpt = OmegaConf.select(cfg, "ckpt", default=None, throw_on_missing=False)
    if ckpt:
        log.info("model=%s is run; ckpt=%s is not used", path, ckpt)
    constructor = {"format": "onnx", "extractor": model.contract.get("extractor")}
    return LoadedExtractor(model, constructor, None, CheckpointMeta(), DEFAULT_PRECISION,
                           int(model.contract.get("epoch") or 0), onnx_model=path)


def load_extractor(cfg: DictConfig) -> LoadedExtractor:
    """`cfg.model` (an exported ONNX model), else `cfg.ckpt` (our checkpoint: its stored architecture unless
    extractor_from_ckpt=false) or the `extractor` config's own weights (zoo key / random init) when ckpt is null;
    in eval mode on `cfg.device`."""
    if cfg.get("model"):
        return load_onnx(cfg)
    ckpt = cfg.get("ckpt")
    model, loaded, extractor_cfg = build_extractor_for_inference(cfg.extractor, ckpt,
                                                                 cfg.get("extractor_from_ckpt", True))
    meta = CheckpointMeta.from_checkpoint(loaded)
    constructor = OmegaConf.to_container(extractor_constructor_cfg(extractor_cfg), resolve=True)
    assert isinstance(constructor, dict)
    model.eval().to(resolve_device(cfg.get("device", "auto")))
    return LoadedExtractor(model, constructor, Path(ckpt).resolve() if ckpt else None, meta,
                           run_precision(cfg, meta), int(loaded.get("epoch", 0)))


def warn_if_transforms_differ(cfg: DictConfig, meta: CheckpointMeta) -> None:
    """The training run's config is next to its checkpoints: a different val transform gives wrong neighbours."""
    run_cfg = training_run_config(meta)
    if run_cfg is None or "transforms" not in run_cfg or "val" not in run_cfg.transforms:
        return
    ours = OmegaConf.to_container(cfg.transforms.val, resolve=True)
    theirs = OmegaConf.to_container(run_cfg.transforms.val, resolve=False)
    if ours != theirs:
        log.warning("transforms.val differs from the training run's (%s): %s vs %s. Pass the same transforms "
                    "group (e.g. transforms=digits) or the neighbours will be wrong",
                    Path(str(meta.run_dir)) / "config.yaml", ours, theirs)


@dataclass(frozen=True)
class CalibratedThreshold:
    """A distance threshold calibrated at a false match rate on a validation set (accept a pair when d <= value)."""

    value: float
    fmr: Optional[float]
    distance: Optional[str]
    source: str


def calibrated_threshold(extractor: LoadedExtractor) -> Optional[CalibratedThreshold]:
    """The threshold the checkpoint's metadata or the ONNX model's contract (model.json) records, None if none."""
    if extractor.onnx_model is not None:
        contract = getattr(extractor.model, "contract", {}) or {}
        value = contract.get("threshold")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return CalibratedThreshold(float(value), contract.get("threshold_fmr"), contract.get("threshold_distance"),
                                       str(contract_path(extractor.onnx_model)))
        return None
    if extractor.meta.threshold is None:
        return None
    return CalibratedThreshold(extractor.meta.threshold, extractor.meta.threshold_fmr,
                               extractor.meta.threshold_distance, f"checkpoint {extractor.checkpoint}")


__all__ = ["CalibratedThreshold", "LoadedExtractor", "calibrated_threshold", "load_extractor", "load_onnx",
           "run_precision", "training_run_config", "warn_if_transforms_differ"]
