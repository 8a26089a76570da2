"""Cross-dataset validation: extra validation sets beside the main one, each reported under its name, with the
numbers each set gives when it is validated alone."""
from __future__ import annotations

import json

import pytest

from metriclab.core.errors import ConfigError
from metriclab.jobs.train import train
from metriclab.jobs.validate import validate
from tests.helpers import compose_cfg, fast_overrides, validate_overrides, write_tiny_dataset


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cross")
    a, b = tmp / "a", tmp / "b"
    write_tiny_dataset(a, n_train_classes=4, n_val_classes=3, per_class=6, seed=0)
    write_tiny_dataset(b, n_train_classes=2, n_val_classes=4, per_class=5, seed=1)
    return a, b


def test_training_reports_each_set_and_equals_validating_it_alone(two_datasets, tmp_path):
    a, b = two_datasets
    result = train(compose_cfg("train", fast_overrides(tmp_path, a) + [
        "sampler.n_labels=4", "sampler.n_instances=3", f"+extra_validation.other={b}",
        "metric_for_checkpointing=other/mAP", "logger=tensorboard"]))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert {"mAP", "other/mAP", "other/cmc@1", "other/n_queries"} <= set(metrics)
    assert metrics["other/n_queries"] == 20  # 4 validation digits x 5 images of set b, each query and gallery
    assert metrics["n_queries"] == 18
    last = result["last_ckpt"]
    alone_a = validate(compose_cfg("validate", validate_overrides(tmp_path, a) + [
        f"ckpt={last}", "evaluation.tsne=false", f"paths.run_dir={tmp_path}/va"]))["metrics"]
    alone_b = validate(compose_cfg("validate", validate_overrides(tmp_path, b) + [
        f"ckpt={last}", "evaluation.tsne=false", f"paths.run_dir={tmp_path}/vb"]))["metrics"]
    for k in ("mAP", "cmc@1", "mINP", "precision@5"):
        assert metrics[k] == pytest.approx(alone_a[k], abs=1e-6), k
        assert metrics[f"other/{k}"] == pytest.approx(alone_b[k], abs=1e-6), k
    # validate.py with the same extra set gives the same numbers in one run
    both = validate(compose_cfg("validate", validate_overrides(tmp_path, a) + [
        f"ckpt={last}", "evaluation.tsne=false", f"paths.run_dir={tmp_path}/vab", f"+extra_validation.other={b}"]))
    assert both["metrics"]["other/mAP"] == pytest.approx(alone_b["mAP"], abs=1e-6)
    assert both["metrics"]["mAP"] == pytest.approx(alone_a["mAP"], abs=1e-6)


def test_bad_extra_sets_are_one_line_before_any_run(two_datasets, tmp_path):
    a, b = two_datasets
    base = validate_overrides(tmp_path, a) + ["evaluation.tsne=false"]
    cases = [
        ([f"+extra_validation.other={tmp_path}/nowhere"], "`extra_validation.other=.*`: the folder does not exist"),
        (["+extra_validation.bad/name=x"], None),  # Hydra or we refuse it; either way no run
        ([f"+extra_validation.other={b}", f"embeddings={tmp_path}/e.npz"], "needs a model to embed its images"),
    ]
    (tmp_path / "e.npz").write_bytes(b"")
    for extra, message in cases:
        with pytest.raises(Exception) as err:
            validate(compose_cfg("validate", base + extra))
        if message:
            assert err.type is ConfigError
            assert err.match(message)
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="metric_for_checkpointing=x/mAP is not computed"):
        train(compose_cfg("train", fast_overrides(tmp_path, a) + [f"+extra_validation.other={b}",
                                                                   "metric_for_checkpointing=x/mAP"]))
