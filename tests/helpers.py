"""Helpers the tests share: a tiny real-image dataset, fast overrides, config composition, the CLI environment.

Test modules import these from here, never from one another (conftest.py holds only fixtures).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import metriclab.core.config  # noqa: F401  (repo_root resolver)
from metriclab.core.paths import CONFIGS_DIR

#: the environment the entry scripts run in: one thread, Hydra's short errors, the default MLflow store
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0"}
ENV.pop("MLFLOW_TRACKING_URI", None)


def write_tiny_dataset(root: Path, n_train_classes: int = 4, n_val_classes: int = 3, per_class: int = 6,
                       seed: int = 0, csv_name: str = "dataset.csv") -> pd.DataFrame:
    """Real digit scans (sklearn) as 32x32 PNGs: train classes 0..n-1, validation classes after them, every
    validation image both query and gallery (the metric-learning protocol)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    rows = []
    for label in range(n_train_classes + n_val_classes):
        split = "train" if label < n_train_classes else "validation"
        for i in rng.choice(np.flatnonzero(digits.target == label), per_class, replace=False):
            rel = f"{split}/{label}/{i:04d}.png"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            img = (digits.images[i] / 16 * 255).astype(np.uint8)
            Image.fromarray(img, mode="L").resize((32, 32), Image.BILINEAR).save(root / rel)
            is_val = split == "validation"
            rows.append({"label": label, "path": rel, "split": split,
                         "is_query": True if is_val else None, "is_gallery": True if is_val else None,
                         "category": "low" if label % 2 == 0 else "high"})
    df = pd.DataFrame(rows)
    df.to_csv(root / csv_name, index=False)
    return df


def fast_overrides(tmp_path: Path, dataset_root: Optional[Path] = None) -> List[str]:
    """Overrides that make any config run in seconds on CPU, writing only under tmp_path."""
    out = [
        f"paths.outputs_dir={tmp_path}/outputs",
        f"paths.run_dir={tmp_path}/run",
        "extractor.weights=null",
        "trainer.max_epochs=1",
        "trainer.enable_progress_bar=false",
        "num_threads=1",
        "transforms=digits",
    ]
    if dataset_root is not None:
        out.append(f"dataset.root={dataset_root}")
    return out


def validate_overrides(tmp_path: Path, dataset_root: Optional[Path] = None) -> List[str]:
    """fast_overrides for validate, which has no trainer (it embeds and evaluates without Lightning)."""
    return [o for o in fast_overrides(tmp_path, dataset_root) if not o.startswith("trainer.")]


def compose_cfg(config_name: str, overrides: List[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def train_tiny(tmp: Path, *extra: str) -> dict:
    """A tiny model trained on `write_tiny_dataset` data under `tmp` (one epoch, 4 digits x 3 images per batch): the
    fixture of the tests that need a trained checkpoint. Returns tmp, root, the train result and its best.ckpt."""
    from metriclab.jobs.train import train

    root = tmp / "data"
    write_tiny_dataset(root)
    result = train(compose_cfg("train", fast_overrides(tmp, root) + [
        "sampler.n_labels=4", "sampler.n_instances=3", "optimizer.lr=1e-3", *extra]))
    return {"tmp": tmp, "root": root, "result": result, "ckpt": Path(result["best_ckpt"])}


def cli_overrides(tmp_path: Path, dataset_root: Path) -> List[str]:
    """fast_overrides for a script run: the run dir comes from Hydra there (outputs/<task>/<timestamp>)."""
    return [o for o in fast_overrides(tmp_path, dataset_root) if not o.startswith("paths.run_dir")] + [
        "sampler.n_labels=4", "sampler.n_instances=3"]
