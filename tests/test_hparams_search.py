"""`hparams_search=<name> -m`: Optuna studies over a training config, one parent MLflow run per study.

The studies run as a user runs them (`scripts/train.py ... -m` in a subprocess) on tiny real digit scans, one epoch
per trial, with the hermetic MLflow store under tmp_path; what they left in MLflow is then read back and compared
with what the trials themselves logged.
"""
from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.utils import get_class
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict, read_write

from metriclab.core.paths import CONFIGS_DIR, REPO_ROOT
from metriclab.tracking.status import FAILED, KILLED
from metriclab.tracking.study import (
    KIND_TAG,
    PARENT_TAG,
    STUDY_ENV,
    STUDY_FILE,
    STUDY_KIND,
    TRIAL_TAG,
    StudyCallback,
    end_unfinished_studies,
    trial_tags,
)
from tests.helpers import ENV, cli_overrides, write_tiny_dataset

#: each study config and the primary config it is meant for
STUDIES = {"digits": "digits_demo", "generic": "train"}
#: the tiny data has 4 train labels of 6 images: n x k fixed to fit it; the rest stays as the config searches it
TINY_NK = "sampler.n_labels: 2, sampler.n_instances: 3"


def compose_with_hydra(config_name: str, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def run_study(tmp_path: Path, overrides, config_name: str = "digits_demo") -> subprocess.CompletedProcess:
    """The study as a user starts it; timm's tiny test_resnet (0.4M parameters, the digits study's extractor is
    timm) and no worst-query pictures keep a trial at a few seconds."""
    data = tmp_path / "data"
    if not data.is_dir():
        write_tiny_dataset(data)
    cmd = [sys.executable, "scripts/train.py", "--config-name", config_name, *cli_overrides(tmp_path, data),
           "trainer.check_val_every_n_epoch=1", "extractor.arch=test_resnet", "evaluation.worst_queries=0",
           *overrides, "-m"]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def study_runs(tmp_path: Path):
    """(client, the parent run, its trials' runs by trial number) from the study's MLflow store."""
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    exp_ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exp_ids)
    parents = [r for r in runs if r.data.tags.get(KIND_TAG) == STUDY_KIND]
    assert len(parents) == 1, [r.data.tags.get(KIND_TAG) for r in runs]
    children = {int(r.data.tags[TRIAL_TAG]): r for r in runs if r.data.tags.get(PARENT_TAG) == parents[0].info.run_id}
    assert len(children) == len(runs) - 1  # every other run is a trial of this study
    return client, parents[0], children


def best_of(client: MlflowClient, run, metric: str = "val/mAP") -> float:
    return max(m.value for m in client.get_metric_history(run.info.run_id, metric))


def test_a_study_is_one_parent_run_with_its_trials_nested(tmp_path):
    out = run_study(tmp_path, ["hparams_search=digits", "hydra.sweeper.n_trials=3",
                               f"hydra.sweeper.params={{{TINY_NK}}}"])
    assert out.returncode == 0, out.stderr[-3000:]
    client, parent, children = study_runs(tmp_path)
    assert parent.info.status == "FINISHED" and sorted(children) == [0, 1, 2]
    assert all(c.info.status == "FINISHED" for c in children.values())
    assert parent.info.experiment_id == children[0].info.experiment_id
    # the objective: each trial's best val/mAP, as the trial logged it; the parent keeps the best trial's
    best_values = {n: best_of(client, c) for n, c in children.items()}
    best_n = max(best_values, key=best_values.__getitem__)
    assert parent.data.metrics["best/mAP"] == pytest.approx(best_values[best_n], rel=1e-6)
    assert parent.data.metrics["n_trials"] == 3 and parent.data.metrics["n_failed"] == 0
    searched = ["optimizer.lr", "criterion.margin", "extractor.embedding_size", "sampler.n_labels",
                "sampler.n_instances"]
    for key in searched:
        assert parent.data.params[f"best.{key}"] == children[best_n].data.params[key]
    assert parent.data.tags["best.run_id"] == children[best_n].info.run_id
    assert len({children[n].data.params["optimizer.lr"] for n in children}) == 3  # TPE searched it
    # the table: one line per trial with its objective, status and run id, then the best one
    for n, child in children.items():
        line = next(ln for ln in out.stdout.splitlines() if ln.startswith(f"{n} ") and child.info.run_id in ln)
        assert f"{best_values[n]:.4f}" in line and "FINISHED" in line
    assert f"best: trial {best_n}, mAP={best_values[best_n]:.4f}" in out.stdout
    assert f"runs/{parent.info.run_id}" in out.stdout  # the parent's UI link


def test_a_failing_trial_fails_alone(tmp_path):
    # lr=-1.0 makes Adam refuse to build inside the run: with the config's seed (1234) trial 0 draws it, 1 and 2 not
    space = ("{optimizer.lr: 'choice(0.001, -1.0, 0.002)', criterion.margin: 0.2, extractor.embedding_size: 32, "
             f"{TINY_NK}}}")
    out = run_study(tmp_path, ["hparams_search=digits", "hydra.sweeper.n_trials=3", f"hydra.sweeper.params={space}"])
    assert out.returncode == 0, out.stderr[-3000:]
    _, parent, children = study_runs(tmp_path)
    failed = sorted(n for n, c in children.items() if c.info.status == "FAILED")
    negative = sorted(n for n, c in children.items() if float(c.data.params["optimizer.lr"]) < 0)
    assert failed == negative == [0]
    assert all(children[n].info.status == "FINISHED" for n in (1, 2))
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["n_failed"] == 1 and parent.data.metrics["n_trials"] == 3
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("error: trial 0 failed:")]
    assert len(errors) == 1 and "Invalid learning rate" in errors[0]
    assert "Traceback" not in out.stderr  # one line, the traceback is in the trial's folder
    assert math.isfinite(parent.data.metrics["best/mAP"])


@pytest.mark.parametrize("ending, status", [("every trial failed", "FAILED"), ("stopped", "KILLED")])
def test_the_parent_never_stays_running(tmp_path, monkeypatch, ending, status):
    """The hooks as Hydra calls them, in this process: two trials fail; then either the sweep ends (the sweeper
    itself raises then: no trial completed, so the entry ends the study) or it is stopped (Ctrl-C, SIGTERM)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sweep = tmp_path / "sweep"
    cfg = compose_with_hydra("digits_demo", ["hparams_search=digits", f"paths.outputs_dir={tmp_path}",
                                             f"hydra.sweep.dir={sweep}"])
    study = StudyCallback()
    study.on_multirun_start(cfg)
    run_id = os.environ[STUDY_ENV]
    assert json.loads((sweep / STUDY_FILE).read_text())["parent_run_id"] == run_id
    for number in (0, 1):
        job_cfg = copy.deepcopy(cfg)
        with read_write(job_cfg), open_dict(job_cfg):
            job_cfg.hydra.job.num = number
            job_cfg.hydra.runtime.output_dir = str(sweep / str(number))
        job = JobReturn(overrides=[f"optimizer.lr={-number - 1.0}", "sampler.n_labels=5", "dataset.root=/data"],
                        status=JobStatus.FAILED)
        job.return_value = ValueError("Invalid learning rate")
        study.on_job_end(job_cfg, job)
    if ending == "stopped":
        assert end_unfinished_studies(KILLED) == 1
    else:
        study.on_multirun_end(cfg)
        assert end_unfinished_studies(FAILED) == 0  # already ended: nothing left for the entry
    parent = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert parent.info.status == status and parent.data.tags[KIND_TAG] == STUDY_KIND
    assert parent.data.metrics["n_trials"] == 2 and parent.data.metrics["n_failed"] == 2
    assert "best/mAP" not in parent.data.metrics and STUDY_ENV not in os.environ
    assert parent.data.params["search.optimizer.lr"] == "tag(log, interval(1e-4, 1e-2))"
    records = sorted(json.loads(p.read_text())["params"]["optimizer.lr"] for p in (sweep / "study_trials").iterdir())
    assert records == ["-1.0", "-2.0"]  # the searched keys only, as the trial got them


def test_hparams_search_without_multirun_is_a_usage_error(tmp_path):
    out = subprocess.run([sys.executable, "scripts/train.py", "--config-name", "digits_demo", "hparams_search=digits",
                          f"paths.outputs_dir={tmp_path}"], cwd=REPO_ROOT, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and "add -m" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "train").exists()


@pytest.mark.parametrize("name", sorted(STUDIES))
@pytest.mark.parametrize("mode, direction", [("max", "maximize"), ("min", "minimize")])
def test_direction_follows_mode_for_checkpointing(name, mode, direction):
    cfg = compose_with_hydra(STUDIES[name], [f"hparams_search={name}", f"mode_for_checkpointing={mode}"])
    assert cfg.hydra.sweeper.direction == direction
    assert cfg.hparams_search.optimized_metric == cfg.metric_for_checkpointing


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_study_configs_compose_and_search_existing_keys(name, tmp_path):
    cfg = compose_with_hydra(STUDIES[name], [f"hparams_search={name}", f"paths.outputs_dir={tmp_path}"])
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.sampler._target_ == "optuna.samplers.TPESampler" and cfg.hydra.sweeper.sampler.seed
    assert get_class(cfg.hydra.callbacks.study._target_) is StudyCallback
    params = cfg.hydra.sweeper.params
    assert "optimizer.lr" in params and "sampler.n_labels" in params and "sampler.n_instances" in params
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    assert all(o.is_sweep_override() for o in parsed)
    missing = object()
    for key in params:
        assert OmegaConf.select(cfg, str(key), default=missing) is not missing, key
    if name == "digits":
        assert {"criterion.margin", "extractor.embedding_size"} <= set(params)
        assert cfg.criterion._target_.endswith("TripletLossWithMiner")  # the loss its margin space is for


def test_outside_a_study_no_trial_tags():
    assert trial_tags() == {}
