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


#: post-processing and flip TTA in the per-epoch validation too: the same numbers under DDP as in one process
POST = ["postprocess=[aqe,k_reciprocal]", "postprocess.k_reciprocal.k1=5", "postprocess.aqe.k=2",
        "evaluation.flip_tta=true"]


def test_ddp_training_is_one_run_and_validation_matches_one_process(tmp_path, tiny_dataset):
    train_args = ["scripts/train.py", *cli_overrides(tmp_path, tiny_dataset), "trainer=ddp", "trainer.devices=2",
                  "trainer.max_epochs=2", "sampler.n_labels=2", *POST, f"+extra_validation.again={tiny_dataset}"]
    _run(train_args)
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FINISHED"]  # rank 1 opened no run of its own
    history = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "val/mAP")}
    assert sorted(history) == [0, 1]
    run_dir = next((tmp_path / "outputs" / "train").glob("*/checkpoints/best.ckpt")).parent.parent
    assert (run_dir / "train_ddp_process_1.log").exists()  # really 2 processes

    # the last epoch's validation under DDP (each rank embeds half the rows, the rows are gathered and the padding
    # repeats dropped) gives the numbers one process gets from the same weights
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "validate"
    _run(["scripts/validate.py", f"paths.outputs_dir={out}", "transforms=digits", f"dataset.root={tiny_dataset}",
          f"ckpt={run_dir / 'checkpoints' / 'last.ckpt'}", "evaluation.tsne=false", "num_threads=1", *POST,
          f"+extra_validation.again={tiny_dataset}"])
    one_process = json.loads(next(out.glob("validate/*/metrics.json")).read_text())
    assert one_process["n_queries"] == 18 and ddp_metrics.keys() == one_process.keys()
    assert "plain/mAP" in ddp_metrics and ddp_metrics["plain/mAP"] != ddp_metrics["mAP"]
    # an extra validation set (here the same rows again: a second validation dataloader) gives the same numbers
    assert ddp_metrics["again/mAP"] == pytest.approx(ddp_metrics["mAP"], abs=1e-6)
    assert ddp_metrics == pytest.approx(one_process, abs=1e-6)
    assert history[1] == pytest.approx(one_process["mAP"], abs=1e-6)
