"""A checkpoint as an ONNX model: the graph (dynamic batch axis), a parity check against PyTorch on real images of
the dataset, and the preprocessing contract (`model.json`, also the ONNX file's metadata_props, one JSON string per
key). Only a model that passed the check is written, atomically: a failure leaves no model.onnx behind.

Flip TTA (`evaluation.flip_tta=true`) is inside the exported graph: the model returns the mean of the image's and its
mirror's embeddings, re-normalised when the extractor normalises (as metriclab.models.tta does). A caller gives the
plain image; applying flip TTA again on top changes nothing (the graph's output is already mirror-symmetric).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from oml.const import INPUT_TENSORS_KEY
from oml.datasets import ImageBaseDataset

from metriclab.core.atomic import atomic_write, write_json_atomic
from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.config import build
from metriclab.core.constants import VALIDATION_SPLIT
from metriclab.core.errors import ConfigError
from metriclab.core.paths import contract_path
from metriclab.data.contract import read_dataset_csv
from metriclab.inference.onnx_model import open_session
from metriclab.inference.search_index import file_sha256
from metriclab.models.extractors import load_checkpoint
from metriclab.models.tta import normalises

INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
#: ONNX's protobuf limit: a bigger model would need external data files (not written here)
MAX_SINGLE_FILE_BYTES = 2 * 1024**3 - 64 * 1024**2


class ExportedExtractor(torch.nn.Module):
    """What the ONNX graph computes: the extractor's embeddings, with flip TTA folded in when asked for."""

    def __init__(self, extractor: torch.nn.Module, flip_tta: bool = False, renormalise: bool = False):
        super().__init__()
        self.extractor = extractor
        self.flip_tta = flip_tta
        self.renormalise = renormalise

    def _extract(self, images: torch.Tensor) -> torch.Tensor:
        extract = getattr(self.extractor, "extract", None)
        return extract(images) if callable(extract) else self.extractor(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        plain = self._extract(images)
        if not self.flip_tta:
            return plain
        mean = (plain + self._extract(torch.flip(images, dims=[-1]))) / 2
        return torch.nn.functional.normalize(mean, dim=1) if self.renormalise else mean


def checkpoint_run_dir(ckpt: Path | str) -> Optional[Path]:
    """The training run folder a checkpoint names (`CheckpointMeta.run_dir`) when its config.yaml is there."""
    meta = CheckpointMeta.from_checkpoint(load_checkpoint(ckpt, mmap=True))
    if meta.run_dir and (Path(meta.run_dir) / "config.yaml").is_file():
        return Path(meta.run_dir)
    return None


def parity_images(cfg: DictConfig, transform: Any, n: int) -> tuple[torch.Tensor, List[str], str]:
    """The first `n` validation rows of the dataset's CSV through the val transform ([n, C, H, W]), their paths and
    the CSV they come from; fewer when the CSV has fewer."""
    dataset = build(cfg.dataset, "dataset")
    df = read_dataset_csv(dataset.root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
    rows = df[df["split"] == VALIDATION_SPLIT].head(n)
    if rows.empty:
        raise ConfigError(f"{Path(dataset.root) / dataset.csv} has no validation rows: the export's parity check "
                          f"needs real images of the dataset")
    paths = [str(Path(dataset.root) / p) for p in rows["path"]]
    try:
        images = torch.stack([item[INPUT_TENSORS_KEY] for item in ImageBaseDataset(paths=paths, transform=transform)])
    except Exception as e:  # an unreadable image or a transform that gives images of different sizes
        raise ConfigError(f"the parity images ({paths[0]}, ...) cannot be read through transforms.val: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
    return images.float(), paths, str(Path(dataset.root) / dataset.csv)


def export_graph(module: torch.nn.Module, example: torch.Tensor, path: Path, opset: int) -> Path:
    """`module` as an ONNX file with a dynamic batch axis (torch.export-based exporter), one file (no external
    data); the exporter's progress lines are not printed."""
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    if size > MAX_SINGLE_FILE_BYTES:
        raise ConfigError(f"the extractor's weights are {size / 1024**3:.1f} GiB: over ONNX's 2 GiB single-file "
                          f"limit, which this export writes")
    quiet = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:  # their INFO lines (graph passes) would go to the job's log
            q.setLevel(logging.WARNING)
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(module, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamo=True, external_data=False, opset_version=int(opset), verbose=False,
                              dynamic_shapes={"images": {0: batch}})
    except Exception as e:  # the exporter's own error types; the message says which operator
        raise ConfigError(f"torch.onnx.export failed: {type(e).__name__}: {' '.join(str(e).split())[:400]}") from e
    finally:
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    return path


def compare(session: Any, module: torch.nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """max |onnxruntime - PyTorch| and the smallest row cosine similarity between the two on `images`."""
    with torch.no_grad():
        ref = module(images).float().numpy().astype(np.float64)
    out = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0].astype(np.float64)
    cos = (out * ref).sum(1) / np.maximum(np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1), 1e-12)
    return {"images": int(len(images)), "max_abs_diff": float(np.abs(out - ref).max()),
            "min_cosine": float(cos.min())}


def measure_parity(session: Any, module: torch.nn.Module, images: torch.Tensor,
                   batch_sizes: Sequence[int]) -> Dict[str, Dict[str, float]]:
    """`compare` at each batch size (the first b images), keyed `batch_<b>`."""
    return {f"batch_{b}": compare(session, module, images[:b]) for b in batch_sizes}


def check_parity(parity: Dict[str, Dict[str, float]], atol: float, min_cosine: float, what: str) -> None:
    """A ConfigError (one line) when any batch is worse than the tolerances."""
    for key, found in parity.items():
        bad_diff = not found["max_abs_diff"] <= atol  # NaN fails too
        bad_cos = not found["min_cosine"] >= min_cosine
        if bad_diff or bad_cos:
            raise ConfigError(f"ONNX parity check failed for {what} at {key.replace('_', ' ')}: max |diff| "
                              f"{found['max_abs_diff']:.3g} (parity.atol={atol:g}), min cosine "
                              f"{found['min_cosine']:.6f} (parity.min_cosine={min_cosine:g}); nothing written")


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def preprocessing_of(transform: Any) -> Dict[str, Any]:
    """What the built val transform does to an RGB uint8 image: its steps, and the normalisation (pixel /
    max_pixel_value, then (x - mean) / std); identity values when it has no Normalize step."""
    steps, norm = [], {"max_pixel_value": 255.0, "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}
    for step in getattr(transform, "transforms", []):
        args = step.get_transform_init_args() if hasattr(step, "get_transform_init_args") else {"repr": repr(step)}
        steps.append({"name": type(step).__name__, **_json_safe(args)})
        if type(step).__name__ == "Normalize":
            norm = {"max_pixel_value": float(getattr(step, "max_pixel_value", None) or 255.0),
                    "mean": [float(v) for v in np.ravel(step.mean)], "std": [float(v) for v in np.ravel(step.std)]}
    return {"preprocessing": steps, **norm}


def threshold_from_meta(meta: CheckpointMeta) -> Dict[str, Any]:
    """The calibrated distance threshold a checkpoint records (`CheckpointMeta.threshold` and the false-match rate
    it was calibrated at, `threshold_fmr`); None for each where the checkpoint has none."""
    return {"threshold": meta.threshold, "threshold_fmr": meta.threshold_fmr,
            "threshold_distance": meta.threshold_distance}


@dataclass
class ExportSource:
    """What is exported: the built extractor, its config and checkpoint, and the job's settings."""

    extractor: torch.nn.Module
    constructor_cfg: Dict[str, Any]
    ckpt: Path
    meta: CheckpointMeta
    epoch: int
    flip_tta: bool


def build_contract(cfg: DictConfig, source: ExportSource, images: torch.Tensor, outputs: torch.Tensor,
                   transform: Any) -> Dict[str, Any]:
    """model.json without the parity numbers: the facts a caller needs to feed the model and read its output."""
    evaluation = build(cfg.evaluation, "evaluation")
    run_cfg_precision = OmegaConf.select(cfg, "precision", default=None)
    return {
        "format_version": 1, "input_name": INPUT_NAME, "output_name": OUTPUT_NAME,
        "layout": "NCHW", "dtype": "float32", "channel_order": "RGB", "batch": "dynamic",
        "input_size": [int(images.shape[2]), int(images.shape[3])],
        "input_scaling": "RGB uint8 pixels / max_pixel_value, then (x - mean) / std per channel",
        **preprocessing_of(transform),
        "transforms_val": OmegaConf.to_container(cfg.transforms.val, resolve=True),
        "embedding_size": int(outputs.shape[1]),
        "normalised": normalises(outputs),
        "normalise_features": source.constructor_cfg.get("normalise_features"),
        "distance": evaluation.distance,
        "flip_tta": source.flip_tta, "flip_tta_in_graph": source.flip_tta,
        "precision": "32-true", "trained_precision": None if run_cfg_precision is None else str(run_cfg_precision),
        "extractor": source.constructor_cfg,
        "checkpoint": str(source.ckpt), "checkpoint_sha256": file_sha256(source.ckpt), "epoch": source.epoch,
        "training_run_dir": source.meta.run_dir, "mlflow_run_id": source.meta.mlflow_run_id,
        **threshold_from_meta(source.meta),
        "opset": int(cfg.opset),
        "versions": {p: version(p) for p in ("torch", "onnx", "onnxruntime")},
    }


def write_model(onnx_file: Path, contract: Dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """`<out_dir>/model.onnx` (the graph with the contract as metadata_props) and `model.json`, both atomic; when
    model.json cannot be written the new model.onnx is removed again."""
    import onnx

    proto = onnx.load(str(onnx_file))
    del proto.metadata_props[:]
    for key, value in sorted(contract.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    model_path = out_dir / "model.onnx"
    atomic_write(model_path, lambda tmp: onnx.save(proto, tmp), ".onnx")
    try:
        json_path = write_json_atomic(contract_path(model_path), contract)
    except BaseException:
        model_path.unlink(missing_ok=True)
        raise
    return model_path, json_path


def export_checked(cfg: DictConfig, source: ExportSource, transform: Any, out_dir: Path) -> Dict[str, Any]:
    """Export, check parity on real validation images, write model.onnx + model.json; returns the contract with
    `model` and `contract` (the paths written) and `parity_images` (how many, from which CSV)."""
    parity_cfg = build(cfg.get("parity"), "parity")
    batches = sorted({1, int(parity_cfg.batch_size)})
    images, _, csv = parity_images(cfg, transform, max(batches))
    batches = sorted({min(b, len(images)) for b in batches})
    plain = ExportedExtractor(source.extractor).eval()
    with torch.no_grad():
        renormalise = normalises(plain(images))  # as metriclab.models.tta decides it for the flip's mean
    module = ExportedExtractor(source.extractor, source.flip_tta, renormalise).eval()
    with torch.no_grad():
        outputs = module(images)
    contract = build_contract(cfg, source, images, outputs, transform)
    example = images[:2] if len(images) > 1 else images.repeat(2, 1, 1, 1)
    with tempfile.TemporaryDirectory(prefix="metriclab_export_") as tmp:
        onnx_file = export_graph(module, example, Path(tmp) / "model.onnx", int(cfg.opset))
        session = open_session(onnx_file, ["CPUExecutionProvider"], torch.get_num_threads())
        parity = measure_parity(session, module, images, batches)
        contract["parity"] = {**parity, "atol": parity_cfg.atol, "min_cosine": parity_cfg.min_cosine,
                              "provider": "CPUExecutionProvider", "images_from": csv}
        check_parity(parity, parity_cfg.atol, parity_cfg.min_cosine, str(source.ckpt))
        model_path, json_path = write_model(onnx_file, contract, out_dir)
    return {**contract, "model": model_path, "contract": json_path, "example": images[:1].numpy()}


def parity_lines(parity: Dict[str, Any]) -> List[str]:
    """The parity numbers as printed lines, one per batch size."""
    return [f"  {key.replace('_', ' ')}: max |diff| {v['max_abs_diff']:.3g}, min cosine "
            f"{v['min_cosine']:.7f}" for key, v in parity.items() if key.startswith("batch_")]


def size_mb(path: Path) -> float:
    return math.ceil(path.stat().st_size / 1024**2 * 10) / 10


__all__ = ["ExportSource", "ExportedExtractor", "INPUT_NAME", "OUTPUT_NAME", "build_contract", "check_parity",
           "checkpoint_run_dir", "compare", "export_checked", "export_graph", "measure_parity", "parity_images",
           "parity_lines", "preprocessing_of", "size_mb", "threshold_from_meta", "write_model"]
