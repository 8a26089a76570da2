"""`extractor=timm`: pooling, projection, BNNeck and normalisation by value; weights files (weights-only, a pickle
refused, timm's own state dicts and safetensors); freezing; the checkpoint round trip; train then validate.

timm's tiny `test_resnet` (0.4M parameters, BatchNorm, 96 features) and `test_vit` (64 features, 160x160 input)
keep it fast; nothing is downloaded (`weights=hub` is checked by recording what timm is asked for)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from omegaconf import OmegaConf
from oml.utils.images.images import imread_cv2
from safetensors.torch import save_file
from torch import nn

import metriclab.models.timm_extractor as timm_module
from metriclab.core.checkpoint import CHECKPOINT_META_KEY, CheckpointMeta, checked_architecture
from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.jobs.train import apply_freezing, train
from metriclab.jobs.validate import validate
from metriclab.models.extractors import build_extractor, build_extractor_for_inference, load_checkpoint
from metriclab.models.timm_extractor import TimmExtractor, gem
from metriclab.training.callbacks import FreezeBackbone
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

ARCH = "test_resnet"
TARGET = "metriclab.models.timm_extractor.TimmExtractor"


def node(**values):
    return OmegaConf.create({"_target_": TARGET, "arch": ARCH, "weights": None, **values})


def built(seed=0, **values) -> TimmExtractor:
    torch.manual_seed(seed)
    return build_extractor(node(**values))


def images(n=4, side=48, seed=1):
    return torch.rand(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_extractor_timm_composes_and_builds():
    cfg = compose_cfg("train", ["extractor=timm", f"extractor.arch={ARCH}", "extractor.weights=null"])
    model = build_extractor(cfg.extractor)
    assert isinstance(model, TimmExtractor) and model.feat_dim == 96 and model.input_size == (3, 160, 160)
    assert model.eval()(images()).shape == (4, 96)
    assert cfg.extractor.weights is None and OmegaConf.load("configs/extractor/timm.yaml").weights == "hub"


def test_pooling_choices_by_value():
    x = images(2)
    for pooling, reduce in (("avg", lambda f: f.mean((2, 3))), ("max", lambda f: f.amax((2, 3))),
                            ("catavgmax", lambda f: torch.cat([f.mean((2, 3)), f.amax((2, 3))], 1)),
                            ("gem", lambda f: f.clamp(min=1e-6).pow(3).mean((2, 3)).pow(1 / 3))):
        model = built(pooling=pooling).eval()
        with torch.no_grad():
            out, maps = model(x), model.model.forward_features(x)
        assert out.shape == (2, model.feat_dim) and model.feat_dim == (192 if pooling == "catavgmax" else 96)
        torch.testing.assert_close(out, reduce(maps), rtol=1e-5, atol=1e-6)
    # GeM by hand: ((1^3 + 3^3) / 2)^(1/3) = 14^(1/3)
    assert gem(torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)).item() == pytest.approx(14 ** (1 / 3), rel=1e-6)
    with pytest.raises(ValueError, match="needs a \\[B, C, H, W\\] feature map"):
        gem(torch.ones(1, 5, 8))
    vit = built(arch="test_vit", pooling="avg").eval()
    assert vit.feat_dim == 64 and vit(torch.rand(2, 3, 160, 160)).shape == (2, 64)


def test_projection_bnneck_and_normalisation_by_value():
    model = built(embedding_size=24, bnneck=True).eval()
    assert model.feat_dim == 24 and model.projection.bias is None
    assert not model.bnneck.bias.requires_grad and model.bnneck.weight.requires_grad  # the BNNeck's frozen shift
    x = images(3)
    with torch.no_grad():
        pooled = model.model(x)
        expected = (pooled @ model.projection.weight.T) / torch.sqrt(torch.tensor(1.0 + 1e-5))  # fresh BN stats
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    normalised = built(embedding_size=24, normalise_features=True).eval()
    torch.testing.assert_close(normalised(x).norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)


def test_bad_values_name_the_key(monkeypatch):
    with pytest.raises(ConfigError, match="(?s)`extractor` could not be built.*not a timm model name"):
        build_extractor(node(arch="resnet_that_does_not_exist"))
    with pytest.raises(ConfigError, match="`extractor.weights=nowhere.pth` is neither a zoo key"):
        build_extractor(node(weights="nowhere.pth"))
    with pytest.raises(ConfigError, match="could not be built"):  # timm's own check: ViTs have no catavgmax
        build_extractor(node(arch="test_vit", pooling="catavgmax"))
    asked = []  # weights=hub is timm's pretrained=True (cannot download here: recorded, then built without)
    create = timm.create_model
    monkeypatch.setattr(timm_module.timm, "create_model",
                        lambda name, pretrained=False, **kw: asked.append(pretrained) or create(name, **kw))
    build_extractor(node(weights="hub"))
    build_extractor(node())
    assert asked == [True, False]


def test_weights_files_load_weights_only(tmp_path):
    source = built(seed=3, embedding_size=8).eval()
    torch.save(source.state_dict(), tmp_path / "extractor.pth")
    loaded = build_extractor(node(embedding_size=8, weights=str(tmp_path / "extractor.pth"))).eval()
    x = images()
    assert torch.equal(loaded(x), source(x))
    # timm's own state dict, classifier included (what timm's pretrained files hold), as .pth and as .safetensors
    torch.manual_seed(4)
    backbone = timm.create_model(ARCH, num_classes=10)
    torch.save(backbone.state_dict(), tmp_path / "timm.pth")
    save_file(backbone.state_dict(), str(tmp_path / "timm.safetensors"))
    for name in ("timm.pth", "timm.safetensors"):
        model = build_extractor(node(weights=str(tmp_path / name)))
        for key, value in model.model.state_dict().items():
            assert torch.equal(value, backbone.state_dict()[key]), (name, key)
    # a pickle (a whole module) is refused, not unpickled; another architecture's weights do not load
    torch.save({"state_dict": nn.Linear(2, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match="needs pickled Python objects to load.*refused"):
        build_extractor(node(weights=str(tmp_path / "pickled.pth")))
    torch.save(timm.create_model("test_efficientnet").state_dict(), tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="does not match the configured extractor"):
        build_extractor(node(weights=str(tmp_path / "other.pth")))
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="is not a safetensors file"):
        build_extractor(node(weights=str(tmp_path / "bad.safetensors")))


def _step(model: nn.Module, seed: int = 1) -> None:
    """One SGD step (momentum, weight decay) on every parameter: frozen ones must be skipped."""
    model.train()
    opt = torch.optim.SGD(list(model.parameters()), lr=0.1, momentum=0.9, weight_decay=0.01)
    loss = model(images(4, seed=seed)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _changed(model: nn.Module, before) -> set:
    return {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}


def _snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainable_and_freeze_bn_keep_frozen_weights_bit_identical():
    model = built(embedding_size=16, bnneck=True)
    apply_freezing(model, OmegaConf.create({"trainable": ["layer4", "projection"], "freeze_bn": True}))
    before = _snapshot(model)
    _step(model)
    changed = _changed(model, before)
    assert changed and all(k.startswith(("model.layer4.", "projection.")) for k in changed)
    assert "projection.weight" in changed and any(k.startswith("model.layer4.") and "conv" in k for k in changed)
    assert not any(k.startswith(("bnneck.", "model.bn1.")) or ".bn" in k for k in changed)  # BN stats held too


def test_freeze_n_epochs_freezes_all_but_the_head_then_restores():
    model = built(embedding_size=16, bnneck=True)
    callback = FreezeBackbone(n_epochs=1, head=["projection"])
    callback.freeze(model)
    before = _snapshot(model)
    _step(model)
    assert _changed(model, before) == {"projection.weight"}
    callback.unfreeze(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    assert grads.pop("bnneck.bias") is False and all(grads.values())
    before = _snapshot(model)
    _step(model, seed=2)
    assert any(k.startswith("model.layer1.") for k in _changed(model, before))


def test_checkpoint_round_trip_reproduces_embeddings_exactly(tmp_path):
    args = {"_target_": TARGET, "arch": ARCH, "weights": None, "pooling": "gem", "embedding_size": 16,
            "bnneck": True, "normalise_features": False}
    model = built(seed=5, **{k: v for k, v in args.items() if k not in ("_target_", "arch", "weights")})
    _step(model)  # BN statistics and weights moved away from their initial values
    model.eval()
    x = images()
    expected = model(x)
    ckpt = {"state_dict": {f"extractor.{k}": v for k, v in model.state_dict().items()},
            CHECKPOINT_META_KEY: CheckpointMeta(extractor_cfg=args).to_dict()}
    torch.save(ckpt, tmp_path / "run.ckpt")
    other = compose_cfg("validate", ["extractor=resnet18", "extractor.weights=null"]).extractor
    rebuilt, _, used = build_extractor_for_inference(other, tmp_path / "run.ckpt")
    assert isinstance(rebuilt, TimmExtractor) and used._target_ == TARGET and used.weights is None
    assert torch.equal(rebuilt.eval()(x), expected)
    assert checked_architecture(args, "t") == args
    for bad in ({"model_kwargs": {"_target_": "os.system"}}, {"embedding_size": True}, {"arch": ["x"]},
                {"pooling": 3}):
        with pytest.raises(ConfigError, match="stored extractor argument"):
            checked_architecture({**args, **bad}, "t")


def test_train_then_validate_rebuilds_the_timm_extractor(tmp_path):
    root = tmp_path / "data"
    write_tiny_dataset(root)
    extractor = ["extractor=timm", f"extractor.arch={ARCH}", "extractor.embedding_size=16", "extractor.bnneck=true"]
    cfg = compose_cfg("train", fast_overrides(tmp_path, root) + extractor + [
        "sampler.n_labels=4", "sampler.n_instances=3", "optimizer.lr=1e-3", "logger=tensorboard"])
    result = train(cfg)
    ckpt = Path(result["best_ckpt"])
    stored = CheckpointMeta.from_checkpoint(load_checkpoint(ckpt)).extractor_cfg
    assert stored == {"_target_": TARGET, "arch": ARCH, "weights": None, "pooling": None, "embedding_size": 16,
                      "bnneck": True, "normalise_features": False}
    out = validate(compose_cfg("validate", [
        f"paths.outputs_dir={tmp_path}/outputs", f"paths.run_dir={tmp_path}/val", f"dataset.root={root}",
        f"ckpt={ckpt}", "transforms=digits", "num_threads=1", "logger=tensorboard"]))
    assert out["metrics"]["mAP"] == pytest.approx(result["metrics"]["mAP"], abs=1e-6)
    # the reference: the stored architecture built directly, the checkpoint's weights, the digits transform
    state = load_checkpoint(ckpt)["state_dict"]
    reference = TimmExtractor(**{k: v for k, v in stored.items() if k != "_target_"})
    reference.load_state_dict({k[len("extractor."):]: v for k, v in state.items() if k.startswith("extractor.")})
    transform = build(compose_cfg("validate", ["transforms=digits"]).transforms.val, "transforms.val")
    rows = pd.read_csv(root / "dataset.csv")
    paths = [root / p for p in rows[rows.split == "validation"].path]
    batch = torch.stack([transform(image=imread_cv2(p.read_bytes()))["image"] for p in paths])
    with torch.no_grad():
        expected = reference.eval()(batch).numpy()
    assert out["embeddings"].shape == (len(paths), 16)
    np.testing.assert_allclose(out["embeddings"].numpy(), expected, rtol=0, atol=1e-6)
