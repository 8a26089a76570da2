"""No run status lies, nothing is left RUNNING, concurrent starts are safe (issue 15).

Lightning's end of a fit or validate leaves the run RUNNING (only tracked_run ends it); a run whose owner process is
gone is marked KILLED by the next job on the store, unless it is being resumed; two jobs creating a fresh store at
once both succeed; two configs composed in the same second get different run folders."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from pytorch_lightning import Trainer
from pytorch_lightning.demos.boring_classes import BoringModel

from metriclab.core.config import job_identity
from metriclab.core.paths import CONFIGS_DIR, REPO_ROOT
from metriclab.tracking.owner import KILLED_REASON, OWNER_HOST, OWNER_PID, OWNER_START
from metriclab.tracking.run import tracked_run


def make_cfg(tmp_path):
    return OmegaConf.create({
        "config_name": "unit", "task": "train",
        "logger": {"_target_": "pytorch_lightning.loggers.MLFlowLogger", "experiment_name": "unit",
                   "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "arts")},
    })


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def client_of(tmp_path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")


def status(tmp_path, run_id) -> str:
    return client_of(tmp_path).get_run(run_id).info.status


def quiet_trainer(tracked, **kwargs) -> Trainer:
    return Trainer(logger=tracked.loggers, max_epochs=1, limit_train_batches=2, limit_val_batches=2,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                   accelerator="cpu", **kwargs)


# ------------------------------------------------------------------------------ Lightning does not end the run
def test_validate_and_fit_leave_the_run_running_until_tracked_run_closes_it(tmp_path):
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0001") as tracked:
        run_id = tracked.mlflow_run_id
        quiet_trainer(tracked).validate(BoringModel())  # as validate_before_training does
        assert status(tmp_path, run_id) == "RUNNING"
        quiet_trainer(tracked).fit(BoringModel())
        assert status(tmp_path, run_id) == "RUNNING"
    assert status(tmp_path, run_id) == "FINISHED"


KILLED_AFTER_VALIDATE = """
import sys, time
from omegaconf import OmegaConf
from pytorch_lightning import Trainer
from pytorch_lightning.demos.boring_classes import BoringModel
from metriclab.tracking.run import tracked_run

tmp = sys.argv[1]
cfg = OmegaConf.create({{"config_name": "unit", "task": "train", "logger": {logger}}})
with tracked_run(cfg, tmp + "/run", "unit-killed") as tracked:
    Trainer(logger=tracked.loggers, limit_val_batches=2, enable_progress_bar=False, enable_model_summary=False,
            accelerator="cpu").validate(BoringModel())
    print(tracked.mlflow_run_id, flush=True)  # validate_before_training is over; the training would start here
    time.sleep(600)
"""


def test_a_job_sigkilled_after_its_first_validation_stays_running_then_is_swept(tmp_path):
    logger = OmegaConf.to_container(make_cfg(tmp_path).logger)
    script = KILLED_AFTER_VALIDATE.format(logger=logger)
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=(tmp_path / "stderr.txt").open("w"),
                            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"})
    try:
        run_id = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert run_id, (tmp_path / "stderr.txt").read_text()[-3000:]
    assert status(tmp_path, run_id) == "RUNNING"  # not FINISHED: it never trained
    with tracked_run(make_cfg(tmp_path), tmp_path / "next", "unit-next"):
        pass
    run = client_of(tmp_path).get_run(run_id)
    assert run.info.status == "KILLED"
    assert run.data.tags[KILLED_REASON] == f"owner process {proc.pid} on {socket.gethostname()} no longer exists"


# --------------------------------------------------------------------------------------- owners and the sweep
def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def create_running(client, exp_id, name, **owner) -> str:
    tags = {k: str(v) for k, v in {OWNER_HOST: owner.get("host"), OWNER_PID: owner.get("pid"),
                                   OWNER_START: owner.get("start")}.items() if v is not None}
    return client.create_run(exp_id, run_name=name, tags=tags).info.run_id


def test_runs_of_dead_owners_are_killed_with_the_reason_and_the_others_left_alone(tmp_path):
    client = client_of(tmp_path)
    exp_id = client.create_experiment("other", artifact_location=(tmp_path / "arts").as_uri())
    host, me = socket.gethostname(), psutil.Process()
    my_start, gone = f"{me.create_time():.2f}", dead_pid()
    runs = {
        "dead": create_running(client, exp_id, "dead", host=host, pid=gone, start="12.00"),
        "reused": create_running(client, exp_id, "reused", host=host, pid=os.getpid(), start="12.00"),
        "alive": create_running(client, exp_id, "alive", host=host, pid=os.getpid(), start=my_start),
        "elsewhere": create_running(client, exp_id, "elsewhere", host=f"not-{host}", pid=gone, start="12.00"),
        "untagged": create_running(client, exp_id, "untagged"),
        "resumed": create_running(client, exp_id, "resumed", host=host, pid=gone, start="12.00"),
    }
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0002", resume_run_id=runs["resumed"]) as tracked:
        assert tracked.mlflow_run_id == runs["resumed"]
        got = {name: client.get_run(run_id) for name, run_id in runs.items()}
        assert {name: run.info.status for name, run in got.items()} == {
            "dead": "KILLED", "reused": "KILLED", "alive": "RUNNING", "elsewhere": "RUNNING", "untagged": "RUNNING",
            "resumed": "RUNNING"}
        assert got["dead"].data.tags[KILLED_REASON] == f"owner process {gone} on {host} no longer exists"
        assert got["reused"].data.tags[KILLED_REASON] == (
            f"owner process {os.getpid()} on {host} no longer exists (pid reused by a process started at {my_start})")
        assert not any(KILLED_REASON in got[n].data.tags for n in ("alive", "elsewhere", "untagged", "resumed"))
        # the resumed run now names this process as its owner
        assert {k: got["resumed"].data.tags[k] for k in (OWNER_HOST, OWNER_PID, OWNER_START)} == {
            OWNER_HOST: host, OWNER_PID: str(os.getpid()), OWNER_START: my_start}
    assert client.get_run(runs["resumed"]).info.status == "FINISHED"


def test_a_new_run_names_its_owner(tmp_path):
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0003") as tracked:
        tags = client_of(tmp_path).get_run(tracked.mlflow_run_id).data.tags
    assert (tags[OWNER_HOST], tags[OWNER_PID], tags[OWNER_START]) == (
        socket.gethostname(), str(os.getpid()), f"{psutil.Process().create_time():.2f}")


# ------------------------------------------------------------------------------------------- concurrent starts
OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from omegaconf import OmegaConf
from metriclab.tracking.mlflow_store import open_mlflow_run

tmp, me, rounds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for i in range(rounds):
    (tmp / f"ready-{{i}}-{{me}}").touch()
    while not (tmp / f"go-{{i}}").exists():
        time.sleep(0.001)
    node = OmegaConf.create({{"experiment_name": "unit", "tracking_uri": f"sqlite:///{{tmp}}/{{i}}/mlflow.db"}})
    client, run_id = open_mlflow_run(node, f"run-{{me}}", {{}}, None)
    print(i, run_id, flush=True)
"""


def test_two_jobs_creating_a_fresh_store_at_once_both_succeed(tmp_path):
    rounds = 3
    for i in range(rounds):
        (tmp_path / str(i)).mkdir()
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE.format(), str(tmp_path), me, str(rounds)],
                              cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in "ab"]
    for i in range(rounds):
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"ready-{i}-{me}").exists() for me in "ab"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):  # one died: say why
                for p in procs:
                    p.kill()
                pytest.fail(f"round {i}: " + " | ".join(p.communicate()[1][-1500:] for p in procs))
            time.sleep(0.01)
        (tmp_path / f"go-{i}").touch()  # both start creating the same fresh store now
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    for i in range(rounds):
        client = MlflowClient(f"sqlite:///{tmp_path}/{i}/mlflow.db")
        runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
        assert sorted(r.info.run_name for r in runs) == ["run-a", "run-b"]


def compose_with_hydra(overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def test_two_configs_composed_in_the_same_second_get_different_run_dirs(tmp_path):
    overrides = [f"paths.outputs_dir={tmp_path}/outputs"]
    first, second = compose_with_hydra(overrides), compose_with_hydra(overrides)
    stamps = [first.timestamp, second.timestamp]
    assert first.timestamp == stamps[0]  # one time stamp per config, however often it is read
    assert stamps[0] < stamps[1]  # different, even within one second (`<date>_<time>_<microseconds>`)
    assert all(len(s) == len("2026-12-02_10-55-53_123456") and s[19] == "_" and s[20:].isdigit() for s in stamps)
    dirs = [cfg.hydra.run.dir for cfg in (first, second)]
    assert dirs == [f"{tmp_path}/outputs/train/{s}" for s in stamps]
    names = [job_identity(OmegaConf.merge(cfg, {"paths": {"run_dir": d}}))[1] for cfg, d in zip((first, second), dirs)]
    assert names == [f"train-{s}" for s in stamps]  # the run name keeps its `<config-name>-<timestamp>` shape
