"""Loggers other than the embedded MLflow store: TensorBoard, Neptune (offline), and a real MLflow server."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metriclab.core.compat import neptune_stop_run
from metriclab.jobs.train import train
from metriclab.tracking import loggers as tracking_loggers
from tests.helpers import compose_cfg, fast_overrides

TRAIN = ["sampler.n_labels=4", "sampler.n_instances=3", "trainer.max_epochs=2"]


def test_tensorboard_gets_epoch_metrics_and_grids(tmp_path, tiny_dataset):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train(compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN + ["logger=tensorboard"]))
    events = EventAccumulator(str(result["run_dir"] / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    assert [e.step for e in events.Scalars("val/mAP")] == [0, 1]
    assert events.Scalars("val/mAP")[-1].value == pytest.approx(result["metrics"]["mAP"], abs=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1]
    assert {"worst_queries/epoch_000/worst_queries", "worst_queries/epoch_001/worst_queries"} <= set(tags["images"])
    assert not (tmp_path / "outputs" / "mlflow.db").exists()  # no MLflow run when another logger is chosen


def test_neptune_offline_gets_metrics_and_grids(tmp_path, tiny_dataset, monkeypatch):
    monkeypatch.setenv("NEPTUNE_MODE", "offline")
    monkeypatch.chdir(tmp_path)  # the offline client writes .neptune/ in the working directory
    stops = []  # what the job's clean-up got back from stopping the Neptune run (True: there was one to stop)
    monkeypatch.setattr(tracking_loggers, "neptune_stop_run", lambda lg: stops.append(neptune_stop_run(lg)) or True)
    train(compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN + ["logger=neptune"]))
    assert stops == [True]  # stopped with the job, not at interpreter exit
    logs = list((tmp_path / ".neptune").rglob("data-1.log"))
    assert len(logs) == 1
    import json

    ops = [json.loads(line)["obj"] for line in logs[0].read_text().splitlines() if line.strip()]
    logged = [tuple(op["path"]) for op in ops if op["type"] == "LogFloats"]
    assert logged.count(("training", "val", "mAP")) == 2 and ("training", "train", "loss") in logged
    images = {tuple(op["path"]) for op in ops if op["type"] == "LogImages"}
    assert images == {(folder, f"epoch_00{e}", name) for e in (0, 1) for folder, name in (
        ("worst_queries", "worst_queries"), ("plots", "roc"), ("plots", "distances"))}
    uploads = [op for op in ops if op["path"][0] == "source_code" and op["type"].startswith("Upload")]
    assert all(op["type"] == "UploadFileSet" and op["file_globs"] == [] for op in uploads)  # no code, no git diff


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path}/server.db", "--artifacts-destination", str(tmp_path / "arts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "MLFLOW_TRACKING_URI": ""},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:  # bounded wait for the server to answer on loopback
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, "mlflow server did not start"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_training_against_a_real_mlflow_server(tmp_path, tiny_dataset, mlflow_server):
    result = train(compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN +
                               [f"logger.tracking_uri={mlflow_server}"]))
    client = MlflowClient(mlflow_server)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/mAP")] == [0, 1]
    names = {f.path for f in client.list_artifacts(run.info.run_id, "worst_queries/epoch_001")}
    assert "worst_queries/epoch_001/worst_queries.png" in names
    assert list((tmp_path / "arts").rglob("worst_queries.png"))  # stored by the server, not next to the run dir
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
