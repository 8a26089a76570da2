"""Lightning DDP on 2 CPU processes (gloo): one MLflow run, and validation identical to one process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from metriclab.core.paths import REPO_ROOT
from tests.helpers import ENV, cli_overrides


def _run(args, timeout=400):
    proc = subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_ddp_training_is_one_run_and_validation_matches_one_process(tmp_path, tiny_dataset):
    train_args = ["scripts/train.py", *cli_overrides(tmp_path, tiny_dataset), "trainer=ddp", "trainer.devices=2",
                  "trainer.max_epochs=2", "sampler.n_labels=2"]
    _run(train_args)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]  # rank 1 opened no run of its own
    assert sorted(m.step for m in client.get_metric_history(runs[0].info.run_id, "val/mAP")) == [0, 1]
    run_dir = next((tmp_path / "outputs" / "train").glob("*/checkpoints/best.ckpt")).parent.parent
    assert (run_dir / "train_ddp_process_1.log").exists()

    metrics = {}
    for devices in (1, 2):  # `trainer.devices=2` on the default CPU trainer: Lightning DDP, 2 processes
        out = tmp_path / f"validate_{devices}"
        _run(["scripts/validate.py", f"paths.outputs_dir={out}", f"trainer.devices={devices}", "transforms=digits",
              f"dataset.root={tiny_dataset}", f"ckpt={run_dir / 'checkpoints' / 'best.ckpt'}",
              "evaluation.tsne=false", "num_threads=1", "trainer.enable_progress_bar=false"])
        metrics[devices] = json.loads(next(out.glob("validate/*/metrics.json")).read_text())
        if devices == 2:
            assert list(out.glob("validate/*/*_ddp_process_1.log"))  # really 2 processes
    assert metrics[2].keys() == metrics[1].keys()
    assert metrics[2] == pytest.approx(metrics[1], abs=1e-6)
    assert metrics[1]["n_queries"] == 18
