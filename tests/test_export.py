"""export(cfg) on a tiny trained digits model: parity numbers, the model.json contract against the training config and
the ONNX metadata, the dynamic batch axis, validate / predict with model= against ckpt=, bad files, a failed parity
check that writes nothing, the MLflow model on the training run (status untouched) and the registry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from oml.const import MEAN, STD

from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.inference.export import ExportedExtractor, parity_images, threshold_from_meta
from metriclab.inference.onnx_model import load_onnx_extractor
from metriclab.inference.search_index import file_sha256
from metriclab.jobs.export import export
from metriclab.jobs.predict import predict
from metriclab.jobs.train import train
from metriclab.jobs.validate import validate
from metriclab.models.extractors import build_extractor_for_inference, load_checkpoint
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

TRAIN = ["sampler.n_labels=4", "sampler.n_instances=3", "optimizer.lr=1e-3"]
REGISTERED = "digits_onnx"


def export_cfg(tmp: Path, run_dir: Path, *extra: str):
    return compose_cfg("export", [f"paths.outputs_dir={tmp}/outputs", f"paths.run_dir={run_dir}", "num_threads=1",
                                  *extra])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A training run logged to MLflow (the tests' store under tmp), exported with parity at batch 1 and 7."""
    tmp = tmp_path_factory.mktemp("export")
    root = tmp / "data"
    write_tiny_dataset(root)
    overrides = [o for o in fast_overrides(tmp, root) if not o.startswith("paths.run_dir")]
    trained = train(compose_cfg("train", overrides + TRAIN + [f"paths.run_dir={tmp}/outputs/train/A"]))
    client = MlflowClient(f"sqlite:///{tmp}/outputs/mlflow.db")
    before = client.get_run(trained["mlflow_run_id"])
    result = export(export_cfg(tmp, tmp / "export_job", f"ckpt={trained['best_ckpt']}", "parity.batch_size=7",
                               f"register_as={REGISTERED}"))
    return {"tmp": tmp, "root": root, "trained": trained, "result": result, "client": client, "before": before}


def torch_reference(ckpt: Path, images: torch.Tensor) -> np.ndarray:
    stored = CheckpointMeta.from_checkpoint(load_checkpoint(ckpt)).extractor_cfg
    model, _, _ = build_extractor_for_inference(OmegaConf.create(stored), ckpt)
    with torch.no_grad():
        return ExportedExtractor(model.eval())(images).numpy()


def test_export_writes_the_model_and_the_contract_of_the_training_config(exported):
    result, trained = exported["result"], exported["trained"]
    run_dir = exported["tmp"] / "outputs" / "train" / "A"
    assert (result["model"], result["contract"]) == (run_dir / "export/model.onnx", run_dir / "export/model.json")
    for key in ("batch_1", "batch_7"):
        assert result["parity"][key]["images"] == int(key.split("_")[1])
        assert result["parity"][key]["max_abs_diff"] <= 1e-4 and result["parity"][key]["min_cosine"] >= 0.9999
    contract = json.loads(result["contract"].read_text())
    run_cfg = OmegaConf.load(run_dir / "config.yaml")
    im_size = run_cfg.transforms.val.im_size
    assert contract["input_size"] == [im_size, im_size] == [32, 32]
    assert contract["mean"] == pytest.approx(list(MEAN)) and contract["std"] == pytest.approx(list(STD))
    assert contract["transforms_val"] == OmegaConf.to_container(run_cfg.transforms.val, resolve=True)
    assert contract["normalise_features"] is run_cfg.extractor.normalise_features is False
    assert contract["normalised"] is False  # measured on the parity batch too
    assert (contract["layout"], contract["dtype"], contract["channel_order"]) == ("NCHW", "float32", "RGB")
    assert contract["embedding_size"] == 512 and contract["flip_tta"] is contract["flip_tta_in_graph"] is False
    assert contract["checkpoint_sha256"] == file_sha256(Path(trained["best_ckpt"]))
    assert contract["mlflow_run_id"] == trained["mlflow_run_id"]  # threshold: see the calibration test below
    assert contract["parity"] == json.loads(json.dumps(result["parity"]))
    metadata = {p.key: json.loads(p.value) for p in onnx.load(str(result["model"])).metadata_props}
    assert metadata == contract


def test_dynamic_batch_axis_matches_torch(exported):
    result, root = exported["result"], exported["root"]
    cfg = compose_cfg("export", [f"dataset.root={root}", "transforms=digits"])
    images, _, _ = parity_images(cfg, build(cfg.transforms.val, "transforms.val"), 7)
    reference = torch_reference(Path(exported["trained"]["best_ckpt"]), images)
    session = ort.InferenceSession(str(result["model"]), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[0] == "batch" and session.get_inputs()[0].shape[1:] == [3, 32, 32]
    for b in (1, 3, 7):
        out = session.run(None, {"images": images[:b].numpy()})[0]
        assert out.shape == (b, 512)
        np.testing.assert_allclose(out, reference[:b], atol=1e-4, rtol=0)


def test_validate_with_model_gives_the_ckpt_metrics(exported, tmp_path):
    tmp, root, trained = exported["tmp"], exported["root"], exported["trained"]
    common = [f"paths.outputs_dir={tmp}/outputs", "num_threads=1", f"dataset.root={root}", "evaluation.tsne=false"]
    by_ckpt = validate(compose_cfg("validate", common + [f"paths.run_dir={tmp_path}/c", f"ckpt={trained['best_ckpt']}",
                                                         "transforms=digits"]))
    # the configured transforms (retrieval, 224 px) differ: the model's contract (digits, 32 px) is used
    by_model = validate(compose_cfg("validate", common + [f"paths.run_dir={tmp_path}/m",
                                                          f"model={exported['result']['model']}"]))
    assert by_model["metrics"].keys() == by_ckpt["metrics"].keys()
    assert by_model["metrics"] == pytest.approx(by_ckpt["metrics"], abs=1e-4)
    np.testing.assert_allclose(by_model["embeddings"].numpy(), by_ckpt["embeddings"].numpy(), atol=1e-4, rtol=0)


def test_predict_with_model_gives_the_ckpt_neighbours(exported, tmp_path):
    root, trained = exported["root"], exported["trained"]
    common = [f"paths.outputs_dir={tmp_path}/outputs", f"dataset.root={root}", "num_threads=1", "k=5",
              f"images={root}/validation", "max_pictures=0", f"cache_dir={tmp_path}/cache"]
    by_ckpt = predict(compose_cfg("predict", common + [f"paths.run_dir={tmp_path}/c", f"ckpt={trained['best_ckpt']}",
                                                       "transforms=digits"]))
    by_model = predict(compose_cfg("predict", common + [f"paths.run_dir={tmp_path}/m", "ckpt=null",
                                                        f"model={exported['result']['model']}"]))
    assert not by_model["gallery"].embeddings_from_cache  # the cache key is the ONNX file's, not the checkpoint's
    assert len(by_model["records"]) == len(by_ckpt["records"]) == 18
    for a, b in zip(by_ckpt["records"], by_model["records"]):
        assert a["image"] == b["image"]
        assert [n["path"] for n in a["neighbours"]] == [n["path"] for n in b["neighbours"]]
        np.testing.assert_allclose([n["distance"] for n in b["neighbours"]], [n["distance"] for n in a["neighbours"]],
                                   atol=1e-4, rtol=0)
        assert (a["predicted_label"], a["predicted_class"]) == (b["predicted_label"], b["predicted_class"])
    again = predict(compose_cfg("predict", common + [f"paths.run_dir={tmp_path}/m2", "ckpt=null",
                                                     f"model={exported['result']['model']}"]))
    assert again["gallery"].embeddings_from_cache


def test_bad_model_files_name_the_file(exported, tmp_path):
    model, contract = exported["result"]["model"], exported["result"]["contract"]
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model.read_bytes()[: model.stat().st_size // 2])
    shutil.copy(contract, truncated.with_suffix(".json"))
    with pytest.raises(ConfigError, match=f"model={truncated} is not an ONNX model onnxruntime can load"):
        load_onnx_extractor(truncated, "cpu")
    renamed = tmp_path / "best.onnx"
    shutil.copy(exported["trained"]["best_ckpt"], renamed)
    shutil.copy(contract, renamed.with_suffix(".json"))
    with pytest.raises(ConfigError, match=f"model={renamed} is not an ONNX model"):
        load_onnx_extractor(renamed, "cpu")
    alone = tmp_path / "alone.onnx"
    shutil.copy(model, alone)
    with pytest.raises(ConfigError, match=f"model={alone}: its preprocessing contract {tmp_path / 'alone.json'} is "
                                          f"missing"):
        load_onnx_extractor(alone, "cpu")
    extractor = load_onnx_extractor(model, "cpu")
    assert extractor.providers == ["CPUExecutionProvider"]
    with pytest.raises(ConfigError, match=f"model={model} takes images N x 3 x 32 x 32 .* got 2 x 3 x 40 x 40"):
        extractor.extract(torch.zeros(2, 3, 40, 40))
    with pytest.raises(ConfigError, match="is not an ONNX model"):  # through validate: before any run is opened
        validate(compose_cfg("validate", [f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/v",
                                          f"dataset.root={exported['root']}", f"model={truncated}"]))


def test_parity_failure_is_one_error_and_writes_nothing(exported, tmp_path):
    out = tmp_path / "out"
    cfg = export_cfg(exported["tmp"], tmp_path / "job", f"ckpt={exported['trained']['best_ckpt']}", "parity.atol=0",
                     f"export_dir={out}", "log_model=false")
    with pytest.raises(ConfigError, match=r"ONNX parity check failed for .*best.ckpt at batch 1: max \|diff\| .* "
                                          r"\(parity.atol=0\).*nothing written") as e:
        export(cfg)
    assert "\n" not in str(e.value)
    assert not (out / "model.onnx").exists() and not (out / "model.json").exists()
    assert not out.exists() or not any(out.iterdir())


def test_the_training_run_holds_the_logged_and_registered_model(exported):
    client, trained, before = exported["client"], exported["trained"], exported["before"]
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.status == before.info.status == "FINISHED" and run.info.end_time == before.info.end_time
    assert run.data.tags == before.data.tags  # the owner tags set while logging are put back
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        models = mlflow.search_logged_models(experiment_ids=[run.info.experiment_id], output_format="list",
                                             filter_string=f"source_run_id = '{run.info.run_id}'")
    finally:
        mlflow.set_tracking_uri(None)
    assert [m.name for m in models] == ["model"]
    logged = exported["result"]["logged"]
    assert logged.model_id == models[0].model_id and logged.registered_version == "1"
    versions = client.search_model_versions(f"name = '{REGISTERED}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run.info.run_id)]
    files = [a.path for a in client.list_logged_model_artifacts(logged.model_id)]
    assert "model.onnx" in files and "MLmodel" in files and not any(f.endswith(".ckpt") for f in files)
    mlmodel = client.get_logged_model(logged.model_id)
    assert mlmodel.source_run_id == run.info.run_id and str(mlmodel.status).endswith("READY")


def test_a_state_dict_exports_into_the_jobs_run_dir_and_skips_mlflow(exported, tmp_path, capsys):
    from metriclab.models.extractors import extractor_state_dict

    sd = extractor_state_dict(load_checkpoint(exported["trained"]["best_ckpt"]))
    weights = tmp_path / "weights.pth"
    torch.save(sd, weights)
    cfg = export_cfg(exported["tmp"], tmp_path / "job", f"ckpt={weights}", f"dataset.root={exported['root']}",
                     "transforms=digits", "extractor.weights=null", "parity.batch_size=2")
    result = export(cfg)
    assert result["model"] == tmp_path / "job" / "export" / "model.onnx" and result["logged"] is None
    assert "MLflow: model not logged: the checkpoint names no MLflow run" in capsys.readouterr().out
    assert threshold_from_meta(CheckpointMeta()) == {"threshold": None, "threshold_fmr": None,
                                                     "threshold_distance": None}


def test_the_calibrated_threshold_travels_into_model_json_and_predict_auto(exported, tmp_path):
    trained, root = exported["trained"], exported["root"]
    meta = CheckpointMeta.from_checkpoint(load_checkpoint(Path(trained["best_ckpt"])))
    contract = json.loads(exported["result"]["contract"].read_text())
    assert meta.threshold is not None
    assert (contract["threshold"], contract["threshold_fmr"], contract["threshold_distance"]) == (
        meta.threshold, meta.threshold_fmr, meta.threshold_distance) == (meta.threshold, 0.01, "euclidean")
    records = predict(compose_cfg("predict", [
        f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/p", f"dataset.root={root}", "k=3",
        f"images={root}/train", "max_pictures=0", f"cache_dir={tmp_path}/cache", "num_threads=1",
        f"model={exported['result']['model']}", "threshold=auto"]))["records"]
    assert records and all(r["threshold"] == pytest.approx(meta.threshold) for r in records)
    assert all(r["unknown"] is (r["neighbours"][0]["distance"] > meta.threshold) for r in records)


def test_validate_with_model_alone_uses_the_models_training_run(exported, tmp_path, capsys):
    tmp = exported["tmp"]
    result = validate(compose_cfg("validate", [f"paths.outputs_dir={tmp}/outputs", f"paths.run_dir={tmp_path}/v",
                                               "num_threads=1", "evaluation.tsne=false",
                                               f"model={exported['result']['model']}"]))
    assert f"the training run of model={exported['result']['model']}" in capsys.readouterr().out
    assert result["metrics"]["n_queries"] == 18  # the run's own dataset: 3 validation digits x 6 images
