"""Shared fixtures: a tiny real-image dataset in OML's CSV format and config composition in tmp dirs."""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import metriclab.config  # noqa: F401  (repo_root resolver)
from metriclab.paths import CONFIGS_DIR

torch.set_num_threads(1)  # 2 shared cores: one thread per test process, reproducible numbers


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


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tiny_dataset(root)
    return root


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


def compose_cfg(config_name: str, overrides: List[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)
