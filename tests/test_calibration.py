"""Verification metrics in validation, the calibrated threshold in the checkpoint, and open-set predict.

The metrics are checked against the definitions applied to a dense distance matrix built here (float64, the
exclusions by hand); the threshold in best.ckpt against the metrics.json of the pass it was saved after; predict's
"unknown" against the rule d(nearest) > threshold on distances computed here."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import build_validation_data, read_dataset_csv
from metriclab.evaluation.validation import evaluate_validation
from metriclab.evaluation.verification_reference import verification_from_distances
from metriclab.jobs.predict import predict
from metriclab.models.extractors import load_checkpoint
from tests.helpers import compose_cfg, fast_overrides, train_tiny

KEYS = ("fnmr@fmr_0.1", "fnmr@fmr_0.01", "fnmr@fmr_0.001", "threshold@fmr_0.1", "threshold@fmr_0.01",
        "threshold@fmr_0.001", "eer", "eer_threshold")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    found = train_tiny(tmp_path_factory.mktemp("calibration"), "logger=tensorboard")
    return {**found, "run_dir": found["tmp"] / "run"}


def dense_reference(emb: np.ndarray, labels: np.ndarray, is_q: np.ndarray, is_g: np.ndarray):
    """Positive / negative euclidean distances of every query x gallery pair but a row with itself (float64)."""
    q, g = np.flatnonzero(is_q), np.flatnonzero(is_g)
    d = np.sqrt(((emb[q, None, :].astype(np.float64) - emb[None, g, :]) ** 2).sum(-1))
    valid = q[:, None] != g[None, :]
    same = labels[q][:, None] == labels[g][None, :]
    return d[valid & same], d[valid & ~same]


def test_validation_metrics_follow_the_definitions_on_the_dense_pairs(trained):
    df = read_dataset_csv(trained["root"], "dataset.csv")
    transform = build(compose_cfg("train", fast_overrides(trained["tmp"], trained["root"])).transforms.val,
                      "transforms.val")
    data = build_validation_data(df, trained["root"], transform, 0)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(data.df), 6)).astype(np.float32)
    report = evaluate_validation(torch.from_numpy(emb), data, {"fmr_vals": [0.1, 0.01, 0.001]}, target_fmr=0.05)
    pos, neg = dense_reference(emb, data.labels, data.is_query, data.is_gallery)
    assert report.verification.n_pos_pairs == len(pos) and report.verification.n_neg_pairs == len(neg)
    ref = verification_from_distances(pos, neg, (0.1, 0.05, 0.01, 0.001)).metrics
    for key in (*KEYS, "fnmr@fmr_0.05", "threshold@fmr_0.05"):  # the calibration target is added to fmr_vals
        assert report.metrics[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
    # a hand check of one value: FNMR at the threshold = share of positives farther than it
    t = report.metrics["threshold@fmr_0.1"]
    assert report.metrics["fnmr@fmr_0.1"] == pytest.approx(float((pos > t + 1e-6).mean()))
    assert (neg <= t + 1e-6).mean() <= 0.1
    off = evaluate_validation(torch.from_numpy(emb), data, {"verification": False})
    assert report.verification is not None and off.verification is None and "eer" not in off.metrics


def test_training_records_the_metrics_pictures_and_the_calibrated_threshold(trained):
    metrics = json.loads((trained["run_dir"] / "metrics.json").read_text())
    assert all(math.isfinite(metrics[k]) for k in KEYS)
    assert 0.0 <= metrics["eer"] <= 1.0
    assert metrics["threshold@fmr_0.001"] <= metrics["threshold@fmr_0.01"] <= metrics["threshold@fmr_0.1"]
    assert metrics["fnmr@fmr_0.001"] >= metrics["fnmr@fmr_0.01"] >= metrics["fnmr@fmr_0.1"]
    meta = CheckpointMeta.from_checkpoint(load_checkpoint(trained["ckpt"]))
    # one epoch: best.ckpt was saved after the only validation pass, the one metrics.json holds
    assert meta.threshold == pytest.approx(metrics["threshold@fmr_0.01"])
    assert (meta.threshold_fmr, meta.threshold_distance) == (0.01, "euclidean")
    for name in ("roc.png", "distances.png"):
        assert (trained["run_dir"] / "plots" / "epoch_000" / name).stat().st_size > 5000


def predict_cfg(trained, tmp_path, images, *extra):
    return compose_cfg("predict", [
        f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/run", f"dataset.root={trained['root']}",
        f"ckpt={trained['ckpt']}", "transforms=digits", "num_threads=1", "k=3", f"cache_dir={tmp_path}/cache",
        f"images=[{','.join(map(str, images))}]", *extra])


def test_open_set_predict_answers_unknown_only_past_the_threshold(trained, tmp_path, capsys):
    df = pd.read_csv(trained["root"] / "dataset.csv")
    known = trained["root"] / df[df.split == "validation"].path.iloc[0]  # in the gallery: its nearest is itself
    stranger = trained["root"] / df[df.split == "train"].path.iloc[0]  # a train class: not in the gallery
    closed = predict(predict_cfg(trained, tmp_path / "closed", [known, stranger]))["records"]
    by_image = {Path(r["image"]).name: r for r in closed}
    d_known = by_image[known.name]["neighbours"][0]["distance"]
    d_stranger = by_image[stranger.name]["neighbours"][0]["distance"]
    assert d_known == pytest.approx(0.0, abs=1e-3) and d_stranger > d_known
    assert all(r["predicted_class"] is not None and r["threshold"] is None for r in closed)

    between = (d_known + d_stranger) / 2
    records = predict(predict_cfg(trained, tmp_path / "open", [known, stranger], f"threshold={between}"))["records"]
    out = capsys.readouterr().out
    by_image = {Path(r["image"]).name: r for r in records}
    assert by_image[stranger.name]["unknown"] is True and by_image[stranger.name]["predicted_class"] is None
    assert f"no match (nearest {by_image[stranger.name]['neighbours'][0]['class_name']} at {d_stranger:.3f}" in out
    assert by_image[known.name]["unknown"] is False
    assert by_image[known.name]["predicted_class"] == {Path(r["image"]).name: r for r in closed}[known.name][
        "predicted_class"]

    # auto: the checkpoint's calibrated threshold, and the same rule
    meta = CheckpointMeta.from_checkpoint(load_checkpoint(trained["ckpt"]))
    auto = predict(predict_cfg(trained, tmp_path / "auto", [known, stranger], "threshold=auto"))["records"]
    for r in auto:
        assert r["threshold"] == pytest.approx(meta.threshold)
        assert r["unknown"] is (r["neighbours"][0]["distance"] > meta.threshold)
        assert (r["predicted_class"] is None) is r["unknown"]


@pytest.mark.parametrize("extra, message", [
    (["threshold=auto", "distance=cosine"], "calibrated its threshold for distance=euclidean"),
    (["threshold=auto", "ckpt=null", "extractor.weights=null"], "records no calibrated threshold"),
    (["threshold=0.5", "postprocess=aqe"], "cannot be used with postprocess="),
    (["threshold=-1"], "non-negative distance"),
])
def test_threshold_errors_name_the_problem(trained, tmp_path, extra, message):
    image = trained["root"] / pd.read_csv(trained["root"] / "dataset.csv").path.iloc[0]
    with pytest.raises(ConfigError, match=message):
        predict(predict_cfg(trained, tmp_path, [image], *extra))


@pytest.mark.parametrize("override, key", [("evaluation.fmr_vals=[1.5]", "evaluation.fmr_vals"),
                                           ("calibration.target_fmr=0", "calibration.target_fmr")])
def test_rates_outside_zero_one_are_config_errors(tmp_path, override, key):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tmp_path) + [override])
    group = key.split(".")[0]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(cfg[group], group)


def test_validate_reports_and_draws_the_calibration_target(trained, tmp_path):
    from metriclab.jobs.validate import validate

    out = validate(compose_cfg("validate", [
        f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/v", f"dataset.root={trained['root']}",
        f"ckpt={trained['ckpt']}", "transforms=digits", "num_threads=1", "evaluation.tsne=false",
        "calibration.target_fmr=0.05", "logger=tensorboard"]))
    # 0.05 is not in evaluation.fmr_vals: it is computed because calibration names it
    assert {"threshold@fmr_0.05", "fnmr@fmr_0.05"} <= set(out["metrics"])
    t = out["metrics"]["threshold@fmr_0.05"]
    assert out["metrics"]["threshold@fmr_0.01"] <= t <= out["metrics"]["threshold@fmr_0.1"]
    assert (tmp_path / "v" / "plots" / "epoch_000" / "distances.png").stat().st_size > 5000
