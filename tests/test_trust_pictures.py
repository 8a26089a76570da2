"""Pictures never crash a job: degenerate embeddings (collapsed rows, 1-D) and a failing picture step leave the
metrics, metrics.json and the run's true status; a warning names the picture that was skipped."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import metriclab.training.publish as publish_module
from metriclab.evaluation.pictures import TSNE_MIN_POINTS, tsne_skip_reason
from metriclab.jobs.validate import validate
from tests.helpers import compose_cfg, validate_overrides, write_tiny_dataset

#: 3 validation classes x 6 images, every image a query and a gallery item (write_tiny_dataset's defaults)
N_CLASSES, PER_CLASS = 3, 6


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures") / "data"
    df = write_tiny_dataset(root)
    return root, df[df["split"] == "validation"].reset_index(drop=True)


def run_validate(tmp: Path, root: Path, val, emb: np.ndarray, *extra: str):
    np.savez(tmp / "emb.npz", embeddings=emb.astype(np.float32), paths=val["path"].to_numpy().astype(str))
    cfg = compose_cfg("validate", validate_overrides(tmp, root) + [f"embeddings={tmp / 'emb.npz'}", *extra])
    out = validate(cfg)
    run = MlflowClient(f"sqlite:///{tmp}/outputs/mlflow.db").get_run(out["mlflow_run_id"])
    return out, run


def skipped(caplog, picture: str) -> list:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and picture in r.getMessage() and "skipped" in r.getMessage()]


def test_collapsed_embeddings_skip_the_tsne_and_keep_the_metrics(dataset, tmp_path, caplog):
    """All rows equal (an untrained or broken model) segfaulted sklearn's t-SNE and left the run RUNNING."""
    root, val = dataset
    out, run = run_validate(tmp_path, root, val, np.ones((len(val), 8)))
    # every distance ties, so the pessimistic rule ranks a query's 5 true matches after its 12 false ones
    ap = np.mean([k / (12 + k) for k in range(1, PER_CLASS)])
    assert out["metrics"]["mAP"] == pytest.approx(ap, abs=1e-6)
    assert out["metrics"]["cmc@1"] == 0.0 and out["metrics"]["cmc@10"] == 0.0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(out["metrics"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/mAP"] == pytest.approx(ap, abs=1e-6)
    assert not (tmp_path / "run" / "plots" / "epoch_000" / "tsne.png").exists()
    (message,) = skipped(caplog, "t-SNE plot")
    assert "only 1 distinct point(s) among 18 embeddings" in message
    assert (tmp_path / "run" / "worst_queries" / "epoch_000" / "worst_queries.csv").is_file()


def test_one_dimensional_embeddings_skip_the_tsne_and_keep_the_metrics(dataset, tmp_path, caplog):
    """1-D embeddings raised in the t-SNE (PCA to 2 components of 1 feature) and failed the run."""
    root, val = dataset
    rng = np.random.default_rng(0)
    # each class in its own band of width < 1, the bands 10 apart: retrieval is perfect
    emb = (val["label"].to_numpy() * 10.0 + rng.uniform(0, 1, len(val)))[:, None]
    out, run = run_validate(tmp_path, root, val, emb)
    assert out["metrics"]["mAP"] == pytest.approx(1.0) and out["metrics"]["cmc@1"] == pytest.approx(1.0)
    assert run.info.status == "FINISHED" and run.data.metrics["val/mAP"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["mAP"] == pytest.approx(1.0)
    (message,) = skipped(caplog, "t-SNE plot")
    assert "1 dimension(s)" in message
    assert not (tmp_path / "run" / "plots" / "epoch_000" / "tsne.png").exists()


def test_a_failing_picture_step_is_a_warning_not_a_failed_run(dataset, tmp_path, caplog, monkeypatch):
    root, val = dataset

    def broken(*args, **kwargs):
        raise RuntimeError("cannot draw")

    monkeypatch.setattr(publish_module, "save_worst_queries", broken)
    monkeypatch.setattr(publish_module, "save_tsne", broken)
    emb = np.eye(len(val))[:, :12] + val["label"].to_numpy()[:, None]
    out, run = run_validate(tmp_path, root, val, emb)
    assert run.info.status == "FINISHED"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == pytest.approx(out["metrics"])
    assert run.data.metrics["val/mAP"] == pytest.approx(out["metrics"]["mAP"])
    assert skipped(caplog, "worst-query grid") == [
        f"worst-query grid {tmp_path / 'run' / 'worst_queries' / 'epoch_000'} skipped: RuntimeError: cannot draw"]
    assert skipped(caplog, "t-SNE plot") == [
        f"t-SNE plot {tmp_path / 'run' / 'plots' / 'epoch_000' / 'tsne.png'} skipped: RuntimeError: cannot draw"]


@pytest.mark.parametrize("x, reason", [
    (np.ones((50, 4)), "only 1 distinct point(s) among 50"),
    (np.arange(20.0)[:, None], "1 dimension(s)"),
    (np.repeat(np.eye(4), 5, axis=0), f"only 4 distinct point(s) among 20 embeddings (at least {TSNE_MIN_POINTS}"),
    (1.0 + 1e-9 * np.random.default_rng(0).normal(size=(30, 8)), "one point up to rounding"),
    (np.array([[0.0, np.nan]] * 10), "NaN or inf"),
    (np.random.default_rng(0).normal(size=(30, 8)), None),
])
def test_degenerate_tsne_inputs_are_named(x, reason):
    got = tsne_skip_reason(x)
    assert got is None if reason is None else reason in got
