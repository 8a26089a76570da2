"""GradCAM with similarity targets: a hand-built case, shapes/range on ResNet and ViT, and explain(cfg) end to end."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from oml.models import ResnetExtractor, ViTExtractor
from PIL import Image

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.inference.gradcam import (
    SimilarityTarget,
    overlay,
    resolve_target_layer,
    similarity_cams,
    tensor_to_image,
)
from metriclab.jobs.explain import explain
from tests.helpers import compose_cfg, train_tiny


class PatchModel(torch.nn.Module):
    """conv (bias-free, ReLU) -> global average pool: the embedding only sees where the image is non-zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1, bias=False), torch.nn.ReLU())
        with torch.no_grad():
            self.features[0].weight.abs_()  # non-negative filters: positive input -> positive activations

    def forward(self, x):
        return self.features(x).mean(dim=(2, 3))


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_cam_is_zero_where_the_image_is_empty(distance):
    image = torch.zeros(1, 3, 16, 16)
    image[:, :, 2:7, 3:9] = torch.rand(1, 3, 5, 6) + 0.5  # content in one patch only
    model = PatchModel()
    with torch.no_grad():
        own = model(image)
    # target: an embedding with more of every channel, so the similarity grows with the activations
    cams = similarity_cams(model, image, own * 2.0 if distance == "euclidean" else own + 1.0, distance,
                           target_layer="features.1")
    assert cams.shape == (1, 16, 16) and cams.dtype == np.float32
    outside = np.ones((16, 16), dtype=bool)
    outside[1:8, 2:10] = False  # the patch grown by the 3x3 conv's reach
    assert cams[0][outside].max() == 0.0
    assert cams[0].max() == pytest.approx(1.0, abs=1e-5)  # so the evidence is inside the patch


def test_similarity_target_values():
    e = torch.tensor([1.0, 0.0])
    assert float(SimilarityTarget(e, "cosine")(torch.tensor([2.0, 0.0]))) == pytest.approx(1.0)
    assert float(SimilarityTarget(e, "cosine")(torch.tensor([0.0, 3.0]))) == pytest.approx(0.0)
    assert float(SimilarityTarget(e, "euclidean")(torch.tensor([4.0, 4.0]))) == pytest.approx(-25.0)
    with pytest.raises(ConfigError, match="distance=dot"):
        SimilarityTarget(e, "dot")


def test_resnet_and_vit_maps_have_the_input_shape_and_range():
    torch.manual_seed(0)
    resnet = ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=False)
    images = torch.randn(3, 3, 64, 48)
    resnet.eval()
    with torch.no_grad():
        emb = resnet(images)
    resnet.train()
    bn_stats = resnet.model.bn1.running_mean.clone()
    cams = similarity_cams(resnet, images, emb.flip(0), "euclidean")
    # grad-cam's own scaling (similarity_cams does not clip): this range check fails if that scaling changes
    assert cams.shape == (3, 64, 48) and cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(c.max() in (0.0, pytest.approx(1.0, abs=1e-5)) for c in cams)  # each map scaled to [0, 1] (or flat)
    # run in eval mode (BatchNorm statistics untouched), then the module is left as it was
    assert torch.equal(resnet.model.bn1.running_mean, bn_stats)
    assert resnet.training is True and all(p.grad is None for p in resnet.parameters())

    assert resolve_target_layer(resnet, None, (224, 224))[0] is resnet.model.layer4  # 7x7 map
    assert resolve_target_layer(resnet, None, (256, 128))[0] is resnet.model.layer4  # 8x4 map
    assert resolve_target_layer(resnet, None, (64, 64))[0] is resnet.model.layer3  # 4x4
    assert resolve_target_layer(resnet, None, (64, 48))[0] is resnet.model.layer2  # layer3 would be 4x3
    assert resolve_target_layer(resnet, None, (32, 32))[0] is resnet.model.layer2
    with pytest.raises(ConfigError, match="target_layer=model.layer9"):
        resolve_target_layer(resnet, "model.layer9", (32, 32))

    vit = ViTExtractor(weights=None, arch="vits16", normalise_features=False)
    images = torch.randn(2, 3, 64, 32)
    with torch.no_grad():
        emb = vit(images)
    cams = similarity_cams(vit, images, emb.flip(0), "cosine")
    assert cams.shape == (2, 64, 32) and cams.min() >= 0.0 and cams.max() <= 1.0
    assert all(c.max() in (0.0, pytest.approx(1.0, abs=1e-5)) for c in cams)


def test_tensor_to_image_undoes_the_normalisation():
    transform = build(OmegaConf.create({"_target_": "metriclab.data.transforms.retrieval_val", "height": 16,
                                        "width": 16, "crop_fraction": 1.0}), "t")
    rgb = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3)).astype(np.uint8)
    tensor = transform(image=rgb)["image"]
    back = tensor_to_image(tensor, transform)
    assert back.shape == (16, 16, 3)
    np.testing.assert_allclose(back, rgb / 255.0, atol=1e-5)
    over = overlay(back, np.zeros((16, 16), np.float32))
    assert over.shape == (16, 16, 3) and over.dtype == np.uint8


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny(tmp_path_factory.mktemp("explain"))


def explain_cfg(trained, tmp_path, *extra):
    return compose_cfg("explain", [f"paths.outputs_dir={trained['tmp']}/outputs", f"paths.run_dir={tmp_path}/run",
                                   "num_threads=1", *extra])


def test_explain_a_training_run_logs_the_grid(trained, tmp_path):
    result = trained["result"]
    out = explain(explain_cfg(trained, tmp_path, f"run={result['mlflow_run_id']}", "n_queries=3", "top_k=2"))
    assert out["ckpt"] == str(Path(result["run_dir"]) / "checkpoints" / "best.ckpt")
    assert len(out["maps"]) == 3 and all(m.shape == (3, 32, 32) for m in out["maps"])
    assert all(0.0 <= m.min() and m.max() <= 1.0 for m in out["maps"])

    # the same worst queries, in the same order, as the run's own grid (1 epoch: best = last = epoch 0)
    theirs = pd.read_csv(Path(result["run_dir"]) / "worst_queries" / "epoch_000" / "worst_queries.csv")
    ours = pd.read_csv(out["csv"])
    assert len(ours) == 3 * (1 + 2)
    assert ours.query("position == 0")["path"].tolist() == theirs["path"].head(3).tolist()
    assert ours["explained_by"].str.startswith("similarity to #1").sum() == 3

    with Image.open(out["png"]) as im:
        width, height = im.size
    assert (width, height) == (3 * 200, 3 * 240 + 70)  # 3 rows x 3 tiles of 2.0 x 2.4 in at 100 dpi, + title

    client = MlflowClient(f"sqlite:///{trained['tmp']}/outputs/mlflow.db")
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["task"] == "explain"
    assert run.data.tags["explained_run_id"] == result["mlflow_run_id"]
    assert {f.path for f in client.list_artifacts(run.info.run_id, "gradcam")} == {
        "gradcam/gradcam_worst_queries.png", "gradcam/gradcam_worst_queries.csv"}


def test_explain_with_ckpt_and_dataset(trained, tmp_path):
    out = explain(explain_cfg(trained, tmp_path, f"ckpt={trained['result']['best_ckpt']}",
                              f"dataset.root={trained['root']}", "transforms=digits", "n_queries=1", "top_k=3",
                              "evaluation.distance=cosine", "logger=tensorboard"))
    assert len(out["maps"]) == 1 and out["maps"][0].shape == (4, 32, 32)
    assert out["png"].is_file() and out["mlflow_run_id"] is None


def test_explain_errors_name_the_key(trained, tmp_path):
    with pytest.raises(ConfigError, match="run=0123abc is not in the MLflow store"):
        explain(explain_cfg(trained, tmp_path, "run=0123abc"))
    with pytest.raises(ConfigError, match="dataset.root` is not set"):
        explain(explain_cfg(trained, tmp_path, f"ckpt={trained['result']['best_ckpt']}"))
    with pytest.raises(ConfigError, match="target_layer=model.nothing"):
        explain(explain_cfg(trained, tmp_path, f"run={trained['result']['mlflow_run_id']}",
                            "target_layer=model.nothing", "n_queries=1", "top_k=1"))
    data = tmp_path / "data"
    shutil.copytree(trained["root"], data)
    df = pd.read_csv(data / "dataset.csv")
    broken = data / df.query("split == 'validation'")["path"].iloc[0]
    broken.write_bytes(b"not an image")
    with pytest.raises(ConfigError, match=rf"1 validation image\(s\) cannot be read: {re.escape(str(broken))} \("):
        explain(explain_cfg(trained, tmp_path, f"ckpt={trained['result']['best_ckpt']}", f"dataset.root={data}",
                            "transforms=digits", "logger=tensorboard"))
