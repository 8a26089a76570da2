"""The entry scripts as a user runs them: exit codes, messages, run status on failure/SIGTERM, multirun."""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from metriclab.core.paths import REPO_ROOT
from tests.helpers import ENV, cli_overrides


def _runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    return client, client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_missing_dataset_exits_nonzero_with_one_line_and_leaves_no_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", *cli_overrides(tmp_path, tmp_path / "nowhere")],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    # checked before the job starts: one line, no traceback, no MLflow run and no run folder
    assert proc.stderr.strip().splitlines() == [
        f"error: dataset.root={tmp_path / 'nowhere'} is not a folder: point `dataset.root=` at the converted dataset"]
    assert not (tmp_path / "outputs" / "mlflow.db").exists()
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]


def test_sigterm_marks_run_killed(tmp_path, tiny_dataset):
    proc = subprocess.Popen(
        [sys.executable, "scripts/train.py", *cli_overrides(tmp_path, tiny_dataset), "trainer.max_epochs=500"],
        cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.time() + 240
        # wait until training is under way: the first epoch's metrics are written
        while time.time() < deadline and not list((tmp_path / "outputs" / "train").glob("*/metrics.json")):
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    _, runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["KILLED"]


def test_multirun_gives_one_finished_run_per_job(tmp_path, tiny_dataset):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", *cli_overrides(tmp_path, tiny_dataset),
         "criterion=triplet_hard,arcface", "config_name=sweep"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, runs = _runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.params["criterion._target_"] for r in runs} == {"oml.losses.TripletLossWithMiner",
                                                                  "metriclab.models.losses.ArcFaceLoss"}
    assert len({r.info.run_name for r in runs}) == 2
    assert all(r.info.run_name.startswith("sweep-") for r in runs)


def test_resume_after_sigkill_continues_the_same_run_without_gaps_or_duplicates(tmp_path, tiny_dataset):
    import torch

    args = [sys.executable, "scripts/train.py", *cli_overrides(tmp_path, tiny_dataset)]
    proc = subprocess.Popen(args + ["trainer.max_epochs=300"], cwd=REPO_ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list((tmp_path / "outputs" / "train").glob("*/checkpoints/last.ckpt")):
            assert proc.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)  # no clean-up at all: the run is left RUNNING, as after a crash
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = next((tmp_path / "outputs" / "train").glob("*/checkpoints/last.ckpt")).parent.parent
    killed_epoch = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"]
    client, runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["RUNNING"]
    run_id = runs[0].info.run_id

    final_epochs = killed_epoch + 3
    done = subprocess.run(args + [f"resume={run_dir}", f"trainer.max_epochs={final_epochs}"], cwd=REPO_ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client, runs = _runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run_id, "FINISHED")]
    for key in ("val/mAP", "train/loss", "lr/backbone"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(final_epochs)), (key, sorted(steps))
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == final_epochs - 1
