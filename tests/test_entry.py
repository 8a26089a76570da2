"""The entry scripts answer usage errors at once (metriclab.jobs.entry + checks): one line naming the key or the
file, no traceback, a non-zero exit, and no MLflow run or run folder left behind. Timings are in docs, not here."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

from metriclab.core.paths import REPO_ROOT
from tests.helpers import ENV


def run_script(script: str, args: List[str], tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{script}.py", f"paths.outputs_dir={tmp_path}/outputs", *args],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)


def assert_usage_error(proc: subprocess.CompletedProcess, tmp_path: Path, *named: str) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for text in named:
        assert text in lines[0]
    outputs = tmp_path / "outputs"
    assert not (outputs / "mlflow.db").exists()  # no MLflow run: the store is not even created
    assert not [p for p in outputs.rglob("*") if p.is_file()]  # no run folder (.hydra/, job log) left behind
    return lines[0]


def test_help_lists_the_groups_without_running(tmp_path):
    proc = run_script("train", ["--help"], tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr
    assert "== Configuration groups ==" in proc.stdout and "criterion: " in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_misspelt_override(tmp_path):
    line = assert_usage_error(run_script("train", ["trainer.max_epoch=3"], tmp_path), tmp_path, "trainer.max_epoch")
    assert line == ("error: Could not override 'trainer.max_epoch'. To append to your config use "
                    "+trainer.max_epoch=3 (Key 'max_epoch' is not in struct)")


@pytest.mark.parametrize("override, named", [
    ("+evaluation.distanse=cosine", "`evaluation.distanse` is not a key of `evaluation`"),
    ("+dataset.rooot=/data", "`dataset.rooot` is not a key of `dataset`"),
    ("evaluation.distance=cosin",
     "`evaluation.distance=cosin` is not supported; choose one of ['euclidean', 'cosine']"),
    ("+lr=0.1", "`lr` is not a key of the train config (configs/train.yaml)"),
])
def test_misspelt_key_of_a_plain_group_or_the_primary(tmp_path, override, named):
    proc = run_script("train", [override, f"dataset.root={tmp_path}"], tmp_path)
    assert_usage_error(proc, tmp_path, named)


def test_missing_mandatory_value(tmp_path):
    line = assert_usage_error(run_script("train", [], tmp_path), tmp_path, "`dataset.root` is not set")
    assert "dataset.root=<" in line  # says what to pass


def test_predict_names_every_missing_value(tmp_path):
    line = assert_usage_error(run_script("predict", [], tmp_path), tmp_path, "`dataset.root` is not set")
    assert line.endswith("(also unset: ckpt, images)")


def test_missing_dataset_folder(tmp_path):
    proc = run_script("train", [f"dataset.root={tmp_path / 'nowhere'}"], tmp_path)
    assert_usage_error(proc, tmp_path, f"dataset.root={tmp_path / 'nowhere'} is not a folder")


def test_missing_dataset_csv(tmp_path):
    (tmp_path / "data").mkdir()
    proc = run_script("train", [f"dataset.root={tmp_path / 'data'}", "dataset.csv=other.csv"], tmp_path)
    assert_usage_error(proc, tmp_path, f"{tmp_path / 'data' / 'other.csv'} does not exist")


def test_missing_ckpt(tmp_path, tiny_dataset):
    proc = run_script("validate", [f"dataset.root={tiny_dataset}", f"ckpt={tmp_path / 'no.ckpt'}"], tmp_path)
    assert_usage_error(proc, tmp_path, f"ckpt={tmp_path / 'no.ckpt'} does not exist")


def test_resume_without_last_ckpt(tmp_path, tiny_dataset):
    (tmp_path / "old_run").mkdir()
    proc = run_script("train", [f"dataset.root={tiny_dataset}", f"resume={tmp_path / 'old_run'}"], tmp_path)
    assert_usage_error(proc, tmp_path, f"{tmp_path / 'old_run' / 'checkpoints' / 'last.ckpt'} does not exist")


def test_resume_check_accepts_the_previous_checkpoint_train_falls_back_to(tmp_path, tiny_dataset):
    """The entry check and train() agree: a run folder holding only last.prev.ckpt is resumable."""
    from metriclab.jobs.checks import check_config
    from tests.helpers import compose_cfg

    ckpts = tmp_path / "old_run" / "checkpoints"
    ckpts.mkdir(parents=True)
    cfg = compose_cfg("train", [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run",
                                f"dataset.root={tiny_dataset}", f"resume={tmp_path / 'old_run'}"])
    with pytest.raises(Exception, match="last.ckpt does not exist"):
        check_config(cfg)
    (ckpts / "last.prev.ckpt").write_bytes(b"x")
    check_config(cfg)  # no error: train() resumes from it with a warning


def test_predict_missing_images(tmp_path, tiny_dataset):
    proc = run_script("predict", [f"dataset.root={tiny_dataset}", "ckpt=null", f"images={tmp_path / 'x.jpg'}"],
                      tmp_path)
    assert_usage_error(proc, tmp_path, f"images={tmp_path / 'x.jpg'} does not exist")


def test_usage_error_found_by_the_job_is_one_line_too(tmp_path, tiny_dataset):
    """metric_for_checkpointing is checked by train() itself (it needs the evaluation keys): still one line."""
    proc = run_script("train", [f"dataset.root={tiny_dataset}", "metric_for_checkpointing=cmc@3"], tmp_path)
    assert_usage_error(proc, tmp_path, "metric_for_checkpointing=cmc@3 is not computed")
