"""Cluster launch through hydra-submitit-launcher (configs/hydra/launcher/): the SLURM launcher's size follows the
trainer and a disagreement is a clear error; a job submitted with submitit's local executor trains end to end, and
a job failing inside it still marks its MLflow run FAILED."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR, REPO_ROOT
from metriclab.jobs.checks import check_launcher
from tests.helpers import ENV, cli_overrides


def _with_hydra(tmp_path: Path, overrides):
    """The train config with its `hydra` node (the launcher lives there)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS_DIR), version_base="1.3"):
        return compose("train", overrides=[f"paths.outputs_dir={tmp_path}", f"dataset.root={tmp_path}", *overrides],
                       return_hydra_config=True)


def _runs(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def test_slurm_launcher_follows_the_trainer(tmp_path):
    cfg = _with_hydra(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                                 "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.account is None and launcher.qos is None and launcher.partition is None
    check_launcher(cfg, launcher)
    text = (CONFIGS_DIR / "hydra" / "launcher" / "slurm.yaml").read_text(encoding="utf-8")
    for line in text.splitlines():  # every key commented
        if line.strip() and not line.startswith(("#", " ", "-")) and not line.rstrip().endswith(":"):
            assert "#" in line, line


@pytest.mark.parametrize("override, message", [
    ("hydra.launcher.nodes=3", "hydra.launcher.nodes=3 but trainer.num_nodes=2"),
    ("hydra.launcher.tasks_per_node=1", "tasks_per_node=1 but trainer.devices=4"),
    ("hydra.launcher.gpus_per_node=8", "gpus_per_node=8 but trainer.devices=4"),
    ("trainer.devices=auto", "trainer.devices=auto"),
])
def test_slurm_launcher_disagreeing_with_the_trainer_is_a_config_error(tmp_path, override, message):
    cfg = _with_hydra(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                                 "trainer.devices=4", "trainer.num_nodes=2", override])
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_launcher(cfg, cfg.hydra.launcher)


def test_local_launcher_runs_one_process_per_job(tmp_path):
    cfg = _with_hydra(tmp_path, ["hydra/launcher=local"])
    check_launcher(cfg, cfg.hydra.launcher)
    cfg = _with_hydra(tmp_path, ["hydra/launcher=local", "trainer=ddp"])
    with pytest.raises(ConfigError, match="one process per job"):
        check_launcher(cfg, cfg.hydra.launcher)


def test_the_basic_launcher_is_not_checked(tmp_path):
    cfg = _with_hydra(tmp_path, ["trainer=ddp"])
    check_launcher(cfg, cfg.hydra.launcher)


def test_slurm_submission_script_has_one_task_per_gpu(tmp_path, monkeypatch):
    """The launcher's keys as the plugin hands them to submitit (its own mapping), down to the sbatch lines."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake_bin = tmp_path / "bin"  # submitit's SLURM executor wants srun on the PATH
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    cfg = _with_hydra(tmp_path, ["hydra/launcher=slurm", "trainer=ddp", "trainer.accelerator=gpu",
                                 "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.partition=gpu"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    params = {k: OmegaConf.select(cfg, f"hydra.launcher.{k}") for k in params if k not in ("_target_",)}
    params.pop("name")  # ${hydra.job.name}: set by Hydra at run time
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "sub", slurm_max_num_timeout=0)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k not in ("submitit_folder", "max_num_timeout")})
    script = executor._executor._make_submission_file_text("python job.py", "uid")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --cpus-per-task=8", "#SBATCH --mem=64GB", "#SBATCH --time=1440", "#SBATCH --partition=gpu"):
        assert line in script, script


def test_submitit_local_job_trains_and_finishes(tmp_path, tiny_dataset):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", "hydra/launcher=local", *cli_overrides(tmp_path, tiny_dataset)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = _runs(tmp_path)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    run_dir = Path(runs[0].data.tags["run_dir"])
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "best.ckpt").is_file()
    sweep_dir = run_dir.parent
    assert run_dir.name == "0" and sweep_dir.parent.name == "multirun"
    logs = list((sweep_dir / ".submitit").glob("*/*_log.out"))
    assert logs and "validation after epoch 0" in logs[0].read_text()
    assert str(os.getpid()) != runs[0].data.tags["owner.pid"]  # the job ran in the submitted process


def test_a_job_failing_inside_submitit_marks_its_run_failed(tmp_path, tiny_dataset):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "-m", "hydra/launcher=local",
         *cli_overrides(tmp_path, tiny_dataset), "extractor.trainable=[layer9]"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    runs = _runs(tmp_path)
    assert [r.info.status for r in runs] == ["FAILED"]
    errors = "".join(p.read_text() for p in (tmp_path / "outputs").rglob(".submitit/*/*_log.err"))
    assert "layer9" in errors
