"""The real-data demo: digits written in the fruit-folder layout, and training that measurably learns."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from converters.fruits import convert_fruits
from metriclab.data.digits import CLASS_NAMES, IMAGE_SIZE, write_digits_folders


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits") / "digits"
    counts = write_digits_folders(root, seed=0)
    return root, counts


def test_digits_folders_are_the_whole_dataset_stratified(digits_root):
    from sklearn.datasets import load_digits

    root, counts = digits_root
    assert sum(counts.values()) == 1797
    assert counts == {"train": 1078, "validation": 359, "test": 360}
    for split, n in counts.items():
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == n
        assert sorted({f.parent.name for f in files}) == sorted(CLASS_NAMES)
    # the pixels are sklearn's scan, upscaled: downscaling back gives the original 8x8 values
    target = load_digits()
    some = next((root / "train" / "three").glob("*.png"))
    idx = int(some.stem.split("_")[1])
    assert target.target[idx] == 3
    img = Image.open(some)
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE) and img.mode == "L"


def test_digits_convert_with_the_fruit_converter(digits_root):
    root, counts = digits_root
    df = convert_fruits(root, protocol="closed", query="validation").df
    train, val = df[df.split == "train"], df[df.split == "validation"]
    assert len(train) == counts["train"] and train.label.nunique() == 10
    assert int(val.is_query.sum()) == counts["validation"]
    assert int(val.is_gallery.sum()) == counts["train"]  # closed protocol: the gallery is the train images


@pytest.mark.slow
def test_digits_demo_learns(digits_root, tmp_path):
    """The demo config end to end (~1.5 min): mAP and precision@50 far above random init."""
    from converters.common import write_csv_atomically
    from metriclab.jobs.demo import run_demo
    from tests.helpers import compose_cfg

    root, _ = digits_root
    write_csv_atomically(convert_fruits(root).df, root / "dataset.csv", root)
    cfg = compose_cfg("digits_demo", [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                      f"dataset.root={root}"])
    out = run_demo(cfg)
    before, after = out["random_init"], out["trained"]
    assert after["mAP"] > before["mAP"] + 0.25, (before["mAP"], after["mAP"])
    assert after["precision@50"] > before["precision@50"] + 0.15
    assert after["cmc@1"] >= before["cmc@1"] - 0.01  # top-1 was already high: it must not get worse
    assert np.isfinite(list(after.values())).all()
