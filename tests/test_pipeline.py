"""train(cfg) / validate(cfg) end to end on a tiny real-image dataset: one clean MLflow run each."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from metriclab.core.errors import ConfigError
from metriclab.jobs.train import train
from metriclab.jobs.validate import validate
from tests.helpers import compose_cfg, fast_overrides, validate_overrides

TRAIN_OVERRIDES = ["criterion=triplet_hard", "sampler=balance", "sampler.n_labels=4", "sampler.n_instances=3",
                   "trainer.max_epochs=2", "optimizer.lr=1e-3"]


def _client(tmp_path: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path}/outputs/mlflow.db")


def _only_run(client: MlflowClient):
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_train_then_validate_one_clean_run_each(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN_OVERRIDES + ["config_name=tiny"])
    result = train(cfg)
    client = _client(tmp_path)
    run = _only_run(client)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"tiny-{cfg.timestamp}"
    assert run.data.tags["config_name"] == "tiny" and run.data.tags["dataset"] == "data"
    assert run.data.tags["git_commit"] and run.data.tags["version.torch"].startswith("2.14.1")
    assert run.data.params["criterion._target_"] == "oml.losses.TripletLossWithMiner"
    assert run.data.params["trainer.max_epochs"] == "2"
    # metrics logged with step = epoch
    history = client.get_metric_history(run.info.run_id, "val/mAP")
    assert sorted(m.step for m in history) == [0, 1]
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train/loss")) == [0, 1]
    last = {m.step: m.value for m in history}[1]
    assert last == pytest.approx(result["metrics"]["mAP"])
    assert 0.0 < result["metrics"]["mAP"] <= 1.0
    # artifacts: config, metrics.json, one grid per epoch (never overwritten), no source dumps
    arts = _artifacts(client, run.info.run_id)
    assert {"config/config.yaml", "config/overrides.yaml", "metrics.json",
            "worst_queries/epoch_000/worst_queries.png", "worst_queries/epoch_001/worst_queries.png",
            "worst_queries/epoch_001/worst_queries.csv"} <= arts
    assert not any(a.startswith("code") for a in arts)
    saved = json.loads((result["run_dir"] / "metrics.json").read_text())
    assert saved == pytest.approx(result["metrics"])
    assert Path(result["best_ckpt"]).name == "best.ckpt" and Path(result["last_ckpt"]).name == "last.ckpt"

    # validate the best checkpoint: same numbers as the epoch it was saved at
    best_value = max(m.value for m in history)
    vcfg = compose_cfg("validate", validate_overrides(tmp_path, tiny_dataset) +
                       [f"ckpt={result['best_ckpt']}", f"paths.run_dir={tmp_path}/val"])
    vres = validate(vcfg)
    assert vres["metrics"]["mAP"] == pytest.approx(best_value, abs=1e-6)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    vrun = client.get_run(vres["mlflow_run_id"])
    assert vrun.data.metrics["val/mAP"] == pytest.approx(best_value, abs=1e-6)
    assert json.loads((tmp_path / "val" / "metrics.json").read_text())["mAP"] == pytest.approx(best_value, abs=1e-6)


@pytest.mark.parametrize("override, message, opens_run", [
    ("extractor.arch=resnet999", "extractor.arch=resnet999", True),
    ("dataset.csv=missing.csv", "missing.csv does not exist", False),  # the CSV is read before the run opens
    ("metric_for_checkpointing=cmc@3", "metric_for_checkpointing=cmc@3 is not computed", False),
    ("+criterion.marginn=0.1", "marginn", True),
])
def test_failures_name_the_problem_and_leave_no_running_run(tmp_path, tiny_dataset, override, message, opens_run):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN_OVERRIDES + [override])
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert message in str(err.value)
    db = tmp_path / "outputs" / "mlflow.db"
    if not opens_run:  # found before the run: no MLflow store, no run folder
        assert not db.exists() and not (tmp_path / "run").exists()
        return
    runs = _client(tmp_path).search_runs([e.experiment_id for e in _client(tmp_path).search_experiments()])
    assert db.exists() and len(runs) == 1 and runs[0].info.status == "FAILED"


def test_a_missing_resume_checkpoint_opens_no_run(tmp_path, tiny_dataset):
    cfg = compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN_OVERRIDES +
                      [f"resume={tmp_path}/old_run"])
    with pytest.raises(ConfigError, match=r"resume=.*old_run: .*last.ckpt does not exist"):
        train(cfg)
    assert not (tmp_path / "outputs" / "mlflow.db").exists() and not (tmp_path / "old_run").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from tests.helpers import write_tiny_dataset

    tmp = tmp_path_factory.mktemp("trained")
    root = tmp / "data"
    write_tiny_dataset(root)
    cfg = compose_cfg("train", fast_overrides(tmp, root) + TRAIN_OVERRIDES)
    return tmp, root, train(cfg)


def test_exported_embeddings_validate_to_the_same_numbers(trained, tmp_path):
    tmp, root, result = trained
    base = validate_overrides(tmp_path, root)
    v1 = validate(compose_cfg("validate", base + [f"ckpt={result['last_ckpt']}", "export_embeddings=true",
                                                  "evaluation.tsne_max_points=50"]))
    npz = tmp_path / "run" / "embeddings.npz"
    data = __import__("numpy").load(npz)
    assert data["embeddings"].shape == (18, 512) and len(data["paths"]) == 18
    assert (tmp_path / "run" / "plots" / "epoch_001" / "tsne.png").stat().st_size > 1000
    v2 = validate(compose_cfg("validate", base + [f"embeddings={npz}", f"paths.run_dir={tmp_path}/run2"]))
    assert v2["metrics"] == pytest.approx(v1["metrics"])
    assert v1["metrics"] == pytest.approx(result["metrics"])  # last.ckpt = the last epoch's model


def test_bad_validation_inputs_are_clear_errors(trained, tmp_path):
    import numpy as np

    tmp, root, result = trained
    base = validate_overrides(tmp_path, root)
    not_ckpt = tmp_path / "notes.txt"
    not_ckpt.write_text("hello")
    with pytest.raises(ConfigError, match="not a checkpoint"):
        validate(compose_cfg("validate", base + [f"ckpt={not_ckpt}"]))
    bad = tmp_path / "bad.npz"
    np.savez(bad, embeddings=np.zeros((2, 4), np.float32), paths=np.array(["a", "b"]))
    with pytest.raises(ConfigError, match="18 validation rows of the CSV have no embedding"):
        validate(compose_cfg("validate", base + [f"embeddings={bad}"]))
    np.savez(bad, vectors=np.zeros((2, 4), np.float32))
    with pytest.raises(ConfigError, match="missing array `embeddings`"):
        validate(compose_cfg("validate", base + [f"embeddings={bad}"]))
    runs = _client(tmp_path).search_runs([e.experiment_id for e in _client(tmp_path).search_experiments()])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}


def test_make_worst_fetches_the_grids_of_a_run(trained, tmp_path, capsys):
    import importlib.util

    from metriclab.core.paths import REPO_ROOT

    tmp, _, result = trained
    spec = importlib.util.spec_from_file_location("worst", REPO_ROOT / "scripts" / "worst.py")
    worst = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worst)
    uri = f"sqlite:///{tmp}/outputs/mlflow.db"
    assert worst.main([result["mlflow_run_id"], "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fetched = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert fetched == ["worst_queries/epoch_000/worst_queries.png", "worst_queries/epoch_001/worst_queries.png"]
    table = (tmp_path / "worst_queries" / "epoch_001" / "worst_queries.csv").read_text().splitlines()
    assert table[0] == "query_index,path,label,first_hit_rank,ap" and len(table) == 6  # 5 worst queries
    assert "epoch_001/worst_queries.png" in out
    assert worst.main(["no-such-run", "--tracking-uri", uri]) == 2


def test_validate_accepts_an_extractor_state_dict_and_rejects_bad_weights(trained, tmp_path):
    import torch

    tmp, root, result = trained
    base = validate_overrides(tmp_path, root)
    sd = torch.load(result["last_ckpt"], weights_only=True)["state_dict"]
    weights = tmp_path / "extractor.pth"  # what a user exports: the extractor alone, no loss weights
    torch.save({k[len("extractor."):]: v for k, v in sd.items() if k.startswith("extractor.")}, weights)
    v = validate(compose_cfg("validate", base + [f"ckpt={weights}", "evaluation.tsne=false"]))
    assert v["metrics"] == pytest.approx(result["metrics"])
    with pytest.raises(ConfigError, match="does not match the configured extractor"):
        validate(compose_cfg("validate", base + [f"ckpt={weights}", "extractor=resnet50", "evaluation.tsne=false",
                                                 f"paths.run_dir={tmp_path}/r2"]))
    with pytest.raises(ConfigError, match="neither a zoo key"):
        validate(compose_cfg("validate", base + ["extractor.weights=resnet18_imagenet9k",
                                                 f"paths.run_dir={tmp_path}/r3"]))


@pytest.mark.parametrize("option", ["channels_last=true", "trainer.precision=bf16-mixed"])
def test_speed_options_train_on_cpu(tmp_path, tiny_dataset, option):
    result = train(compose_cfg("train", fast_overrides(tmp_path, tiny_dataset) + TRAIN_OVERRIDES +
                               ["trainer.max_epochs=1", option]))
    assert 0.0 < result["metrics"]["mAP"] <= 1.0


def test_bad_csv_values_name_the_csv_line(tmp_path):
    from metriclab.data.datasets import read_dataset_csv
    from tests.helpers import write_tiny_dataset

    root = tmp_path / "data"
    df = write_tiny_dataset(root)
    first_val = int(df.index[df.split == "validation"][2])  # a validation row after train rows
    df["is_query"] = df["is_query"].astype(object)
    df.loc[first_val, "is_query"] = "maybe"
    df.to_csv(root / "dataset.csv", index=False)
    with pytest.raises(ConfigError, match=rf"row {first_val + 2} \(path={df.path[first_val]}\): `is_query` must be"):
        read_dataset_csv(root)
    assert (root / "dataset.csv").read_text().splitlines()[first_val + 1].split(",")[3] == "maybe"  # that line


@pytest.mark.parametrize("column, value, message", [
    ("label", "abc", "`label` must be integers, got dtype "),  # object or str, by pandas version
    ("label", "1.5", "`label` must be integers, got dtype float64"),
    ("label", "1.0", "`label` must be integers, got dtype float64"),  # parsed as 1.0: found in the CSV text
    ("split", "test", "`split` must be 'train' or 'validation', found ['test']"),
    ("split", "", "`split` must be 'train' or 'validation', found ["),  # 'nan' (pandas 2) or nan (pandas 3)
    ("split", "test,", "`split` must be 'train' or 'validation', found ["),  # an empty cell and 'test'
])
def test_bad_label_or_split_names_the_first_csv_line(tmp_path, column, value, message):
    import re

    from metriclab.data.datasets import read_dataset_csv
    from tests.helpers import write_tiny_dataset

    root = tmp_path / "data"
    df = write_tiny_dataset(root).astype({column: object})
    bad = [3, 20]  # the first one is named
    df.loc[bad, column] = value.split(",") if "," in value else value
    value = df.loc[bad[0], column]
    df.to_csv(root / "dataset.csv", index=False)
    shown = repr(value) if value else "nan"
    with pytest.raises(ConfigError, match=re.escape(message) + rf".*row {bad[0] + 2} \(path={df.path[bad[0]]}\) "
                       rf"has {re.escape(shown)}"):
        read_dataset_csv(root)
    assert str(root / "dataset.csv") in str(pytest.raises(ConfigError, read_dataset_csv, root).value)
    line = (root / "dataset.csv").read_text().splitlines()[bad[0] + 1]  # that CSV line holds the bad value
    assert line.split(",")[list(df.columns).index(column)] == value
