"""scikit-learn's `digits` scans (1,797 real 8x8 images, 10 classes) as a small real dataset on disk.

Written as PNGs in the fruit-folder layout (`train/ validation/ test/<class>/*.png`), then converted to OML's CSV
by the fruit converter, so the demo exercises the same path a user's own folder would.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import numpy as np
from PIL import Image

CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}  # stratified per class
IMAGE_SIZE = 32  # 8x8 scans upscaled (bilinear): ResNet's stem needs more than 8 pixels


def write_digits_folders(out: Path, seed: int = 0) -> Dict[str, int]:
    """Write the PNG tree into `out` (replaced atomically); returns images per split."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)  # pixel values are 0..16
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    counts = {s: 0 for s in SPLIT_FRACTIONS}
    for label, name in enumerate(CLASS_NAMES):
        idx = rng.permutation(np.flatnonzero(digits.target == label))
        n_train = int(round(len(idx) * SPLIT_FRACTIONS["train"]))
        n_val = int(round(len(idx) * SPLIT_FRACTIONS["validation"]))
        parts = {"train": idx[:n_train], "validation": idx[n_train:n_train + n_val], "test": idx[n_train + n_val:]}
        for split, ids in parts.items():
            folder = tmp / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in ids:
                img = Image.fromarray(images[i], mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR)
                img.save(folder / f"digit_{i:04d}.png")
            counts[split] += len(ids)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return counts
