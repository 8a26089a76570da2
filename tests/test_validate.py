"""validate(cfg) on the evaluation-only path: which run it evaluates (none named: the newest training run; run= a
run folder or an MLflow id; command-line overrides win), usage errors before any run, and the embedding precision."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from oml.datasets import ImageBaseDataset

import metriclab.jobs.runs as runs_module
from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.inference.embed import autocast_dtype, check_precision, embed_all, embed_dataset
from metriclab.inference.model import run_precision
from metriclab.jobs.runs import resolve_run, training_runs
from metriclab.jobs.train import train
from metriclab.jobs.validate import validate
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

TRAIN = ["sampler.n_labels=4", "sampler.n_instances=3", "optimizer.lr=1e-3"]
#: what run B trains with that the validate config does not have by default: it must come from the run
RUN_B = ["transforms.train.im_size=40", "transforms.val.im_size=40", "evaluation.cmc_top_k=[1,2]",
         "evaluation.distance=cosine"]


def validate_overrides(tmp: Path, run_dir: Path, *extra: str):
    return [f"paths.outputs_dir={tmp}/outputs", f"paths.run_dir={run_dir}", "num_threads=1", *extra]


def mlflow_runs(tmp: Path):
    db = tmp / "outputs" / "mlflow.db"
    if not db.exists():
        return []
    client = MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Training run A, then B (the newest), both under <outputs>/train like Hydra's run folders."""
    tmp = tmp_path_factory.mktemp("validate")
    root = tmp / "data"
    write_tiny_dataset(root)
    results = {}
    for name, extra in (("A", []), ("B", RUN_B)):
        overrides = [o for o in fast_overrides(tmp, root) if not o.startswith("paths.run_dir")]
        cfg = compose_cfg("train", overrides + TRAIN + extra + [f"paths.run_dir={tmp}/outputs/train/{name}"])
        results[name] = train(cfg)
    return {"tmp": tmp, "root": root, **results}


def test_no_argument_evaluates_the_newest_training_run(two_runs, tmp_path, capsys):
    tmp, b = two_runs["tmp"], two_runs["B"]
    assert training_runs(tmp / "outputs") == [tmp / "outputs" / "train" / "B", tmp / "outputs" / "train" / "A"]
    overrides = ["evaluation.tsne=false"]
    cfg = resolve_run(compose_cfg("validate", validate_overrides(tmp, tmp_path / "val", *overrides)), overrides)
    assert f"the newest training run {tmp / 'outputs' / 'train' / 'B'}" in capsys.readouterr().out
    assert cfg.ckpt == str(tmp / "outputs" / "train" / "B" / "checkpoints" / "best.ckpt")
    assert cfg.dataset.root == str(two_runs["root"])
    assert cfg.transforms.val.im_size == 40 and cfg.transforms.val._target_.endswith("get_normalisation_resize_albu")
    assert list(cfg.evaluation.cmc_top_k) == [1, 2] and cfg.evaluation.distance == "cosine"
    assert cfg.evaluation.tsne is False  # the command line wins over the run and over validate.yaml
    assert cfg.precision == "32-true"  # the run's trainer.precision

    out = validate(cfg)
    assert resolve_run(cfg, overrides) is cfg  # already resolved: not chosen (nor printed) again
    assert out["metrics"].keys() == b["metrics"].keys() and "cmc@2" in out["metrics"]
    assert out["metrics"] == pytest.approx(b["metrics"], abs=1e-6)  # 1 epoch: best = the last validation
    saved = json.loads((tmp_path / "val" / "metrics.json").read_text())
    assert saved == pytest.approx(b["metrics"], abs=1e-6)
    # step and folder = the checkpoint's epoch, as the training run published it
    run = MlflowClient(f"sqlite:///{tmp}/outputs/mlflow.db").get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["val/mAP"] == pytest.approx(b["metrics"]["mAP"])
    assert (tmp_path / "val" / "worst_queries" / "epoch_000" / "worst_queries.csv").is_file()
    # tsne=false: the plots are the verification pictures only
    assert sorted(p.name for p in (tmp_path / "val" / "plots").rglob("*.png")) == ["distances.png", "roc.png"]


def test_run_picks_a_folder_or_an_mlflow_run_and_overrides_win(two_runs, tmp_path, capsys):
    tmp, a, b = two_runs["tmp"], two_runs["A"], two_runs["B"]
    a_dir = tmp / "outputs" / "train" / "A"
    overrides = [f"run={a_dir}", "evaluation.tsne=false"]
    cfg = resolve_run(compose_cfg("validate", validate_overrides(tmp, tmp_path / "a", *overrides)), overrides)
    assert f"run folder {a_dir}" in capsys.readouterr().out
    assert cfg.ckpt == str(a_dir / "checkpoints" / "best.ckpt") and cfg.transforms.val.im_size == 32
    assert validate(cfg)["metrics"] == pytest.approx(a["metrics"], abs=1e-6)

    # an MLflow id; a command-line key under a taken group replaces that key only
    overrides = [f"run={b['mlflow_run_id']}", "evaluation.cmc_top_k=[1,3]", "transforms=digits"]
    cfg = resolve_run(compose_cfg("validate", validate_overrides(tmp, tmp_path / "b", *overrides)), overrides)
    assert f"MLflow run {b['mlflow_run_id']}" in capsys.readouterr().out
    assert cfg.ckpt == str(tmp / "outputs" / "train" / "B" / "checkpoints" / "best.ckpt")
    assert list(cfg.evaluation.cmc_top_k) == [1, 3] and cfg.evaluation.distance == "cosine"  # the rest: the run's
    assert cfg.transforms.val.im_size == 32  # a whole group given on the command line stays the job's

    with pytest.raises(ConfigError, match="is not in the MLflow store"):
        resolve_run(compose_cfg("validate", validate_overrides(tmp, tmp_path / "c", "run=0123abc")), ["run=0123abc"])
    with pytest.raises(ConfigError, match="has no config.yaml"):
        resolve_run(compose_cfg("validate", validate_overrides(tmp, tmp_path / "c", f"run={tmp_path}")), [])


def test_usage_errors_open_no_run(two_runs, tmp_path):
    empty = tmp_path / "empty"
    with pytest.raises(ConfigError, match=r"no training run .*train first .*or pass ckpt=<checkpoint> dataset.root="):
        validate(compose_cfg("validate", validate_overrides(empty, tmp_path / "r1")))
    assert not (empty / "outputs" / "mlflow.db").exists() and not (tmp_path / "r1").exists()

    root = two_runs["root"]
    with pytest.raises(ConfigError, match=f"checkpoint {tmp_path}/missing.ckpt does not exist"):
        validate(compose_cfg("validate", validate_overrides(empty, tmp_path / "r2", f"dataset.root={root}",
                                                            f"ckpt={tmp_path}/missing.ckpt", "transforms=digits")))
    with pytest.raises(ConfigError, match=f"embeddings={tmp_path}/missing.npz does not exist"):
        validate(compose_cfg("validate", validate_overrides(empty, tmp_path / "r3", f"dataset.root={root}",
                                                            f"embeddings={tmp_path}/missing.npz")))
    with pytest.raises(ConfigError, match=f"dataset.root={tmp_path}/nowhere is not a folder"):
        validate(compose_cfg("validate", validate_overrides(empty, tmp_path / "r4", f"dataset.root={tmp_path}/nowhere",
                                                            f"ckpt={two_runs['A']['best_ckpt']}")))
    with pytest.raises(ConfigError, match="`dataset.root` is not set"):
        validate(compose_cfg("validate", validate_overrides(empty, tmp_path / "r5",
                                                            f"ckpt={two_runs['A']['best_ckpt']}")))
    assert mlflow_runs(empty) == [] and not any((tmp_path / f"r{i}").exists() for i in range(1, 6))


def test_runs_module_loads_no_heavy_package():
    import subprocess
    import sys

    code = ("import sys, metriclab.jobs.runs; "
            "print(sorted(m for m in ('torch', 'pytorch_lightning', 'mlflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert runs_module.override_keys(["+a.b=1", "~c", "d=2"]) == ["a.b", "c", "d"]


# ---------------------------------------------------------------------------------------------------- precision
@pytest.fixture(scope="module")
def model_and_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed") / "data"
    df = write_tiny_dataset(root)
    torch.manual_seed(0)
    model = build(OmegaConf.create({"_target_": "oml.models.ResnetExtractor", "weights": None, "arch": "resnet18",
                                    "gem_p": None, "remove_fc": True, "normalise_features": False}), "extractor")
    transform = build(compose_cfg("validate", ["transforms=digits"]).transforms.val, "transforms.val")
    paths = [str(root / p) for p in df["path"]]
    return model.eval(), ImageBaseDataset(paths=paths, transform=transform), paths


def test_32_true_is_the_plain_fp32_forward(model_and_images):
    model, dataset, paths = model_and_images
    batch = torch.stack([dataset[i]["input_tensors"] for i in range(len(dataset))])
    with torch.no_grad():
        plain = model.extract(batch).numpy()
    for precision in (None, "32-true"):
        emb, ok, failed = embed_dataset(model, dataset, batch_size=len(dataset), precision=precision)
        assert emb.dtype == np.float32 and ok == list(range(len(dataset))) and failed == []
        np.testing.assert_array_equal(emb, plain)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_on_cpu_is_bf16_autocast(model_and_images, precision):
    model, dataset, paths = model_and_images
    assert autocast_dtype(precision, torch.device("cpu")) is torch.bfloat16  # fp16 AMP on CPU: bf16, as Lightning
    batch = torch.stack([dataset[i]["input_tensors"] for i in range(len(dataset))])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.extract(batch).float().numpy()
    with torch.no_grad():
        fp32 = model.extract(batch).numpy()
    emb = embed_all(model, dataset, paths, "validation", batch_size=len(dataset), precision=precision)
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb, expected)
    assert not np.array_equal(emb, fp32)  # really another precision...
    np.testing.assert_allclose(emb, fp32, rtol=0.05, atol=0.05 * float(np.abs(fp32).max()))  # ...and close to fp32


def test_precision_values_and_the_training_runs_choice(tmp_path):
    assert autocast_dtype("16-mixed", torch.device("cuda")) is torch.float16
    assert autocast_dtype("32-true", torch.device("cuda")) is None
    with pytest.raises(ConfigError, match="precision=64-true"):
        check_precision("64-true")
    (tmp_path / "config.yaml").write_text("trainer:\n  precision: bf16-mixed\n")
    meta = CheckpointMeta(run_dir=str(tmp_path))
    assert run_precision(OmegaConf.create({"precision": None}), meta) == "bf16-mixed"
    assert run_precision(OmegaConf.create({"precision": "32-true"}), meta) == "32-true"  # the config wins
    assert run_precision(OmegaConf.create({}), CheckpointMeta()) == "32-true"  # nothing known: fp32
