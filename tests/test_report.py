"""The run-comparison report on a store with hand-made runs (known values) and on a real training run."""
from __future__ import annotations

import os
import subprocess
import sys

import pandas as pd
import pytest
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient
from PIL import Image

from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.jobs.train import train
from metriclab.tracking.report import collect_runs, format_duration, loss_name, write_report
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

T0 = 1_700_000_000_000  # ms


def make_run(client, exp_id, name, params, tags, val, loss=None, start=T0, seconds=90.0, status="FINISHED"):
    """A run as metriclab logs it: val/<metric> and train/loss with step = epoch."""
    run = client.create_run(exp_id, run_name=name, start_time=start, tags=tags)
    metrics = [Metric(f"val/{k}", v, start + 1000 * step, step) for k, series in val.items()
               for step, v in enumerate(series)]
    metrics += [Metric("train/loss", v, start + 1000 * step, step) for step, v in enumerate(loss or [])]
    client.log_batch(run.info.run_id, metrics=metrics, params=[Param(k, v) for k, v in params.items()])
    client.set_terminated(run.info.run_id, status, end_time=start + int(seconds * 1000))
    return run.info.run_id


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("fruits")
    other = client.create_experiment("market")
    ids = {
        "triplet": make_run(client, exp, "sweep-0", {"criterion._target_": "oml.losses.TripletLossWithMiner",
                                                     "criterion.miner._target_": "oml.miners.HardTripletsMiner",
                                                     "extractor.arch": "resnet18"},
                            {"config_name": "sweep", "dataset": "fruits", "task": "train"},
                            {"mAP": [0.30, 0.50, 0.40], "cmc_at_1": [0.6, 0.7, 0.9]}, loss=[1.0, 0.8, 0.7],
                            seconds=125),
        "arcface": make_run(client, exp, "sweep-1", {"criterion._target_": "metriclab.models.losses.ArcFaceLoss",
                                                     "extractor.arch": "resnet50"},
                            {"config_name": "sweep", "dataset": "fruits", "task": "train"},
                            {"mAP": [0.55, 0.70], "cmc_at_1": [0.8, 0.85]}, loss=[9.0, 5.0], seconds=3725),
        "failed": make_run(client, exp, "broken", {}, {"config_name": "sweep", "task": "train"}, {}, status="FAILED"),
        "market": make_run(client, other, "market-val", {}, {"config_name": "None", "dataset": "market",
                                                            "task": "validate"}, {"mAP": [0.62]}, seconds=5),
    }
    return uri, tmp_path, ids


def test_helpers_hand_computed():
    assert format_duration(125) == "2m 05s" and format_duration(3725) == "1h 02m 05s" and format_duration(7) == "7s"
    assert format_duration(None) == "-"
    assert loss_name({"criterion._target_": "oml.losses.TripletLossWithMiner",
                      "criterion.miner._target_": "metriclab.models.miners.SemiHardTripletsMiner"}) == \
        "TripletLossWithMiner(SemiHardTripletsMiner)"
    assert loss_name({"criterion._target_": "metriclab.models.losses.ClassificationTripletLoss",
                      "criterion.classification._target_": "metriclab.models.losses.SoftmaxLoss",
                      "criterion.triplet.miner._target_": "oml.miners.HardTripletsMiner"}) == \
        "ClassificationTripletLoss(SoftmaxLoss+HardTripletsMiner)"
    assert loss_name({}) == "-"


def test_table_sorted_by_best_main_metric_with_values_at_that_epoch(store):
    uri, tmp_path, ids = store
    out = write_report(uri, tmp_path / "report", experiments=["fruits"])
    table = out["table"]
    assert table["run"].tolist() == ["sweep-1", "sweep-0"]  # 0.70 > 0.50; the failed run has no val metric
    arc, tri = table.iloc[0], table.iloc[1]
    assert (arc["best mAP"], arc["best epoch"], arc["cmc@1"], arc["last mAP"]) == ("0.7000", "1", "0.8500", "0.7000")
    # sweep-0: best mAP at epoch 1, so cmc@1 is read at epoch 1 (0.7), not its last value (0.9)
    assert (tri["best mAP"], tri["best epoch"], tri["cmc@1"], tri["last mAP"]) == ("0.5000", "1", "0.7000", "0.4000")
    assert (tri["epochs"], tri["duration"], tri["loss"], tri["model"], tri["config"], tri["dataset"]) == (
        "3", "2m 05s", "TripletLossWithMiner(HardTripletsMiner)", "resnet18", "sweep", "fruits")
    assert (arc["loss"], arc["model"], arc["duration"], arc["status"]) == ("ArcFaceLoss", "resnet50", "1h 02m 05s",
                                                                           "FINISHED")
    assert arc["run id"] == ids["arcface"]
    assert [c for c in table.columns if c in ("cmc@5", "precision@5")] == []  # not logged by any run: no column

    md = out["markdown"].read_text()
    assert md.index("| 1 | sweep-1 |") < md.index("| 2 | sweep-0 |")
    assert "![val mAP per epoch](compare_mAP.png)" in md and "(curves/01_sweep-1.png)" in md
    assert "<table" in out["html"].read_text() and 'src="curves/02_sweep-0.png"' in out["html"].read_text()
    assert pd.read_csv(out["csv"])["run"].tolist() == ["sweep-1", "sweep-0"]
    assert sorted(p.name for p in (tmp_path / "report" / "curves").iterdir()) == ["01_sweep-1.png", "02_sweep-0.png"]
    for png in [out["compare_png"], *out["curve_pngs"]]:
        with Image.open(png) as im:
            assert im.format == "PNG" and im.size[0] > 300
    assert not [p for p in (tmp_path / "report").rglob(".*")]  # no temporary files left

    # all experiments: the validate run joins, in its place by mAP; config falls back to the task
    out = write_report(uri, tmp_path / "report")
    table = out["table"]
    assert table["run"].tolist() == ["sweep-1", "market-val", "sweep-0"]
    assert table.iloc[1][["config", "epochs", "duration"]].tolist() == ["validate", "-", "5s"]
    assert sorted(p.name for p in (tmp_path / "report" / "curves").iterdir()) == [
        "01_sweep-1.png", "02_market-val.png", "03_sweep-0.png"]  # stale plots of the previous report removed

    by_cmc = write_report(uri, tmp_path / "report2", experiments=["fruits"], main_metric="cmc@1")["table"]
    assert by_cmc["run"].tolist() == ["sweep-0", "sweep-1"] and by_cmc.iloc[0]["best cmc@1"] == "0.9000"


def test_all_runs_and_errors(store):
    uri, tmp_path, _ = store
    runs = collect_runs(uri, ["fruits"], all_runs=True)
    assert [r.name for r in runs] == ["sweep-1", "sweep-0", "broken"] and runs[-1].status == "FAILED"
    with pytest.raises(ConfigError, match=r"experiment\(s\) \['cars'\] not in the store; it has \['Default', "
                                          r"'fruits', 'market'\]"):
        collect_runs(uri, ["cars"])
    with pytest.raises(ConfigError, match=r"no run has val/recall@3; choose --metric among \['cmc@1', 'mAP'\]"):
        collect_runs(uri, main_metric="recall@3")
    with pytest.raises(ConfigError, match=f"no MLflow store at {tmp_path}/missing.db"):
        collect_runs(f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()  # looking did not create an empty store
    client = MlflowClient(uri)
    client.create_experiment("empty")
    with pytest.raises(ConfigError, match=r"experiment\(s\) \['empty'\].*holds no run with validation metrics"):
        collect_runs(uri, ["empty"])


def test_cli(store):
    uri, tmp_path, _ = store
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.run([sys.executable, "scripts/report.py", "--experiment", "fruits", "--out",
                           str(tmp_path / "cli")], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"report: {tmp_path / 'cli' / 'report.md'}" in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[1].split()[:2] == ["1", "sweep-1"] and lines[2].split()[:2] == ["2", "sweep-0"]
    proc = subprocess.run([sys.executable, "scripts/report.py", "--tracking-uri", f"sqlite:///{tmp_path}/none.db"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"report: no MLflow store at {tmp_path}/none.db" in proc.stderr


def test_report_of_a_real_training_run(tmp_path):
    root = tmp_path / "data"
    write_tiny_dataset(root)
    result = train(compose_cfg("train", fast_overrides(tmp_path, root) + [
        "sampler.n_labels=4", "sampler.n_instances=3", "trainer.max_epochs=2", "config_name=tiny"]))
    uri = f"sqlite:///{tmp_path}/outputs/mlflow.db"
    out = write_report(uri, tmp_path / "report")
    row = out["table"].iloc[0]
    # the expected values straight from the store, not from the report's own summaries
    client = MlflowClient(uri)
    history = {k: {m.step: m.value for m in client.get_metric_history(result["mlflow_run_id"], k)}
               for k in ("val/mAP", "val/cmc_at_1", "train/loss")}
    assert sorted(history["val/mAP"]) == [0, 1] and sorted(history["train/loss"]) == [0, 1]
    best_epoch = min(history["val/mAP"], key=lambda step: (-history["val/mAP"][step], step))
    assert len(out["table"]) == 1 and row["run"] == result["run_name"] and row["config"] == "tiny"
    assert row["run id"] == result["mlflow_run_id"] and row["status"] == "FINISHED"
    assert row["epochs"] == "2" and row["loss"] == "TripletLossWithMiner(HardTripletsMiner)"
    assert row["last mAP"] == f"{result['metrics']['mAP']:.4f}" == f"{history['val/mAP'][1]:.4f}"
    assert row["best mAP"] == f"{history['val/mAP'][best_epoch]:.4f}" and row["best epoch"] == str(best_epoch)
    assert row["cmc@1"] == f"{history['val/cmc_at_1'][best_epoch]:.4f}"
