"""tracked_run without training: tags, params, config artifacts, the final status for every way a job can end,
resuming, and the process-wide MLflow URI put back. Each case is checked in a fresh sqlite store."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import mlflow
import mlflow.tracking._tracking_service.utils as tracking_utils
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from pytorch_lightning.loggers import MLFlowLogger, TensorBoardLogger

from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.tracking.keys import default_tracking_uri
from metriclab.tracking.loggers import RunMLFlowLogger
from metriclab.tracking.run import JobTerminated, tracked_run
from metriclab.tracking.tags import PACKAGES_TO_TAG


def make_cfg(tmp_path, **logger):
    return OmegaConf.create({
        "config_name": "unit", "task": "train", "dataset": {"root": str(tmp_path / "fruits")},
        "trainer": {"max_epochs": 3}, "criterion": {"margin": 0.2, "layers": [1, 2]},
        "logger": {"_target_": "pytorch_lightning.loggers.MLFlowLogger", "experiment_name": "unit",
                   "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
                   "artifact_location": str(tmp_path / "arts"), **logger},
    })


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty sqlite store, made once: creating one costs seconds, copying it nothing."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(tmp_path, empty_store):
    shutil.copy(empty_store, tmp_path / "mlflow.db")


def the_run(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("unit").experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_finished_run_has_tags_params_and_config_artifacts(tmp_path, store):
    cfg = make_cfg(tmp_path)
    with tracked_run(cfg, tmp_path / "run", "unit-0001", overrides=["trainer.max_epochs=3"]) as tracked:
        assert [type(lg) for lg in tracked.loggers] == [RunMLFlowLogger]  # PL's, leaving the status to us
        assert isinstance(tracked.loggers[0], MLFlowLogger)
        assert tracked.run_name == "unit-0001" and tracked.run_dir == tmp_path / "run"
        assert tracked.loggers[0].run_id == tracked.mlflow_run_id
        tracked.log_metrics({"val/cmc@1": 0.5, "val/mAP": 0.25}, step=0)
        run_id = tracked.mlflow_run_id
    client, run = the_run(tmp_path)
    assert (run.info.run_id, run.info.run_name, run.info.status) == (run_id, "unit-0001", "FINISHED")
    # MLflow 3's UI shows the runs table (not its GenAI view) for experiments of this kind
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    tags = run.data.tags
    assert (tags["config_name"], tags["task"], tags["dataset"], tags["run_dir"]) == (
        "unit", "train", "fruits", str(tmp_path / "run"))
    assert tags["git_commit"] == commit.stdout.strip() and tags["git_dirty"] in ("true", "false")
    assert tags["version.mlflow"] == mlflow.__version__ and tags["version.hydra-core"].startswith("1.3.")
    assert {k for k in tags if k.startswith("version.")} == {f"version.{p}" for p in PACKAGES_TO_TAG}
    assert run.data.params == {
        "config_name": "unit", "task": "train", "dataset.root": str(tmp_path / "fruits"), "trainer.max_epochs": "3",
        "criterion.margin": "0.2", "criterion.layers": "[1, 2]", "logger._target_": "pytorch_lightning.loggers."
        "MLFlowLogger", "logger.experiment_name": "unit", "logger.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "logger.artifact_location": str(tmp_path / "arts")}
    assert run.data.metrics == {"val/cmc_at_1": 0.5, "val/mAP": 0.25}
    assert sorted(f.path for f in client.list_artifacts(run_id, "config")) == ["config/config.yaml",
                                                                               "config/overrides.yaml"]
    stored = tmp_path / "arts" / run_id / "artifacts" / "config"  # the experiment's artifact location
    assert yaml.safe_load((stored / "config.yaml").read_text())["trainer"] == {"max_epochs": 3}
    assert yaml.safe_load((tmp_path / "run" / "overrides.yaml").read_text()) == ["trainer.max_epochs=3"]
    # MLFlowLogger set the process-wide URI to the job's store: put back (nothing set, no variable)
    assert "MLFLOW_TRACKING_URI" not in os.environ and tracking_utils._tracking_uri is None
    assert mlflow.get_tracking_uri() != f"sqlite:///{tmp_path}/mlflow.db"


@pytest.mark.parametrize("error, status", [(ValueError("boom"), "FAILED"), (KeyboardInterrupt(), "KILLED"),
                                           (JobTerminated("signal 15"), "KILLED"), (SystemExit(1), "KILLED"),
                                           (SystemExit(0), "FINISHED"), (SystemExit(None), "FINISHED")])
def test_status_from_how_the_job_left(tmp_path, store, error, status):
    with pytest.raises(type(error)):
        with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0001"):
            raise error
    assert the_run(tmp_path)[1].info.status == status


def test_sigterm_is_killed_and_the_handler_put_back(tmp_path, store):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(JobTerminated, match="received signal 15"):
        with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0001"):
            os.kill(os.getpid(), signal.SIGTERM)
    assert the_run(tmp_path)[1].info.status == "KILLED"
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.parametrize("exit_code", [None, 0])
def test_a_swallowed_sigterm_still_ends_killed_with_143(tmp_path, store, exit_code):
    with pytest.raises(SystemExit) as raised:
        with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0001"):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except JobTerminated:
                pass  # as when the signal lands in a garbage-collector callback
            if exit_code is not None:
                raise SystemExit(exit_code)  # Lightning's clean stop at the end of the epoch
    assert raised.value.code == 143
    assert the_run(tmp_path)[1].info.status == "KILLED"


def test_resume_logs_only_new_steps_and_keeps_params(tmp_path, store):
    cfg = make_cfg(tmp_path)
    with tracked_run(cfg, tmp_path / "run", "unit-0001") as tracked:
        tracked.log_metrics({"val/mAP": 0.1}, step=0)
        tracked.log_metrics({"val/mAP": 0.2}, step=1)
        run_id = tracked.mlflow_run_id
    cfg.trainer.max_epochs = 5  # a resumed run keeps the params it started with
    with tracked_run(cfg, tmp_path / "run", "unit-0001", resume_run_id=run_id) as tracked:
        assert tracked.mlflow_run_id == run_id and tracked.logged_until == {"val/mAP": 1}
        assert MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id).info.status == "RUNNING"
        tracked.log_metrics({"val/mAP": 0.9}, step=1)  # the epoch re-run after the crash: already logged
        tracked.log_metrics({"val/mAP": 0.3}, step=2)
    client, run = the_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.params["trainer.max_epochs"] == "3"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/mAP")] == [(0, 0.1), (1, 0.2),
                                                                                        (2, 0.3)]


def test_empty_tracking_uri_is_a_config_error_and_the_env_is_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    with pytest.raises(ConfigError, match=r"`logger.tracking_uri` is empty: set it or MLFLOW_TRACKING_URI"):
        with tracked_run(make_cfg(tmp_path, tracking_uri=""), tmp_path / "run", "unit-0001"):
            pass
    assert os.environ["MLFLOW_TRACKING_URI"] == ""
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "run" / "config.yaml").exists()


def test_failing_logger_build_still_closes_the_opened_run(tmp_path, store):
    cfg = make_cfg(tmp_path, no_such_argument=1)
    with pytest.raises(ConfigError, match=r"`logger` could not be built"):
        with tracked_run(cfg, tmp_path / "run", "unit-0001"):
            pass
    assert the_run(tmp_path)[1].info.status == "FAILED"


def test_other_ranks_open_no_logger_and_write_nothing(tmp_path):
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0001", is_main_process=False) as tracked:
        assert tracked.loggers == [] and tracked.mlflow_run_id is None and tracked.mlflow_client is None
    assert not (tmp_path / "mlflow.db").exists() and list((tmp_path / "run").iterdir()) == []


def test_tensorboard_gets_hyperparameters_and_no_mlflow_run(tmp_path):
    cfg = make_cfg(tmp_path)
    cfg.logger = {"_target_": "pytorch_lightning.loggers.TensorBoardLogger", "name": "tensorboard", "version": "",
                  "default_hp_metric": False}
    with tracked_run(cfg, tmp_path / "run", "unit-0001") as tracked:
        assert [type(lg) for lg in tracked.loggers] == [TensorBoardLogger] and tracked.mlflow_client is None
        assert Path(tracked.loggers[0].log_dir) == tmp_path / "run" / "tensorboard"
    hparams = yaml.safe_load((tmp_path / "run" / "tensorboard" / "hparams.yaml").read_text())
    assert hparams["trainer.max_epochs"] == "3" and hparams["criterion.layers"] == "[1, 2]"
    assert (tmp_path / "run" / "config.yaml").is_file() and not (tmp_path / "mlflow.db").exists()


def test_default_tracking_uri(monkeypatch):
    from metriclab.core.constants import DEFAULT_MLFLOW_URI

    assert default_tracking_uri() == DEFAULT_MLFLOW_URI == f"sqlite:///{REPO_ROOT}/outputs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "")
    assert default_tracking_uri() == DEFAULT_MLFLOW_URI
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri() == "http://127.0.0.1:5000"


def test_an_existing_experiment_gets_the_training_kind(tmp_path, store):
    import mlflow.tracking

    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp_id = client.create_experiment("unit", artifact_location=(tmp_path / "arts").as_uri())  # no kind tag
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0002", overrides=[]):
        pass
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_config_name_tag_is_the_composed_primary_config(tmp_path):
    """A run started with --config-name digits_demo and no `config_name=` is tagged digits_demo (it was tagged
    "None", so `make report` listed such runs as config `train`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from metriclab.core.config import config_name_of, job_identity
    from metriclab.core.paths import CONFIGS_DIR
    from metriclab.tracking.tags import run_tags

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        cfg = compose("digits_demo", [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                      f"dataset.root={tmp_path}"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    try:
        assert cfg.config_name is None  # nothing set on the command line
        assert config_name_of(cfg) == "digits_demo"
        assert run_tags(cfg, tmp_path)["config_name"] == "digits_demo"
        assert job_identity(cfg)[1].startswith("digits_demo-")
        cfg.config_name = "sweep"  # an explicit name wins
        assert run_tags(cfg, tmp_path)["config_name"] == "sweep"
    finally:
        HydraConfig.instance().cfg = None


def test_dataset_inputs_and_source_tags(tmp_path, store):
    """The runs table's Dataset and Source columns: the dataset CSV as an input (name, digest of its bytes, path,
    context) and MLflow's source tags."""
    import hashlib

    root = tmp_path / "fruits"
    root.mkdir()
    (root / "dataset.csv").write_text("label,path,split,is_query,is_gallery\n")
    other = tmp_path / "other"
    other.mkdir()
    (other / "dataset.csv").write_text("label,path\n1,a.png\n")
    cfg = make_cfg(tmp_path)
    cfg.extra_validation = {"other": str(other)}
    with tracked_run(cfg, tmp_path / "run", "unit-0003", overrides=[]):
        pass
    client, run = the_run(tmp_path)
    got = {(d.dataset.name, d.dataset.digest, json.loads(d.dataset.source)["uri"], d.tags[0].value)
           for d in run.inputs.dataset_inputs}
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest()[:10] for p in (root / "dataset.csv", other / "dataset.csv")}
    assert got == {("fruits", digest[root / "dataset.csv"], str(root / "dataset.csv"), "train"),
                   ("other", digest[other / "dataset.csv"], str(other / "dataset.csv"), "validation")}
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert run.data.tags["mlflow.source.name"] == "scripts/train.py"
    assert run.data.tags["mlflow.source.git.commit"] == commit.stdout.strip()


def test_pictures_are_step_images_too(tmp_path, store):
    """The worst-query grid and t-SNE are also MLflow step images, so the run page scrolls through the epochs."""
    from PIL import Image

    png = tmp_path / "grid.png"
    Image.new("RGB", (8, 6), (255, 0, 0)).save(png)
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0004", overrides=[]) as tracked:
        for epoch in (0, 3):
            tracked.log_step_image(png, "worst_queries", step=epoch)
    client, run = the_run(tmp_path)
    names = [a.path for a in client.list_artifacts(run.info.run_id, "images")]
    pngs = [n for n in names if n.endswith(".png") and "worst_queries" in n]
    # MLflow names them images/<key>+step+<step>+timestamp+...png (plus a compressed preview)
    assert sorted(n.split("+step+")[1].split("+")[0] for n in pngs) == ["0", "3"], names


def test_ui_links_open_the_model_training_view(tmp_path, store):
    from metriclab.tracking.links import run_link, tracked_run_link

    assert run_link("sqlite:////x/mlflow.db", "3", "abc") == (
        "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning")
    assert run_link("http://mlflow.lab:8080/", "3", "abc") == (
        "http://mlflow.lab:8080/#/experiments/3/runs/abc?workflowType=machine_learning")
    with tracked_run(make_cfg(tmp_path), tmp_path / "run", "unit-0005", overrides=[]) as tracked:
        link = tracked_run_link(tracked)
        run_id = tracked.mlflow_run_id
    client, run = the_run(tmp_path)
    assert link == (f"http://127.0.0.1:5000/#/experiments/{run.info.experiment_id}/runs/{run_id}"
                    f"?workflowType=machine_learning   (make ui)")
