"""Nothing read from a file executes code: weights files and checkpoints are loaded weights-only, the architecture a
checkpoint stores is checked against the extractor classes we ship, and the predict cache notices edited files."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from metriclab.core.checkpoint import CHECKPOINT_META_KEY, checked_architecture
from metriclab.core.errors import ConfigError
from metriclab.inference.model import load_extractor
from metriclab.inference.search_index import IndexSpec, build_index, load_or_build_gallery, search
from metriclab.models.extractors import build_extractor, build_extractor_for_inference

RESNET = {"_target_": "oml.models.ResnetExtractor", "weights": None, "arch": "resnet18", "gem_p": None,
          "remove_fc": True, "normalise_features": False}


class WritesMarker:
    """Unpickling this object runs `Path(marker).write_text("pwned")`: what a crafted weights file does."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------------------------------------------------
# extractor.weights=<file>


def test_a_pickled_weights_file_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "marker.txt"
    evil = tmp_path / "evil.pth"
    torch.save({"model.conv1.weight": torch.zeros(1), "payload": WritesMarker(marker)}, evil)
    node = OmegaConf.create({**RESNET, "weights": str(evil)})

    with pytest.raises(ConfigError, match=r"evil\.pth needs pickled Python objects.*refused"):
        build_extractor(node)  # train's path
    with pytest.raises(ConfigError, match="needs pickled Python objects"):
        build_extractor_for_inference(node)  # validate / predict / explain without a checkpoint
    with pytest.raises(ConfigError, match="needs pickled Python objects"):
        load_extractor(OmegaConf.create({"extractor": node, "ckpt": None, "device": "cpu"}))
    with pytest.raises(ConfigError, match="needs pickled Python objects"):  # the same file as `ckpt=`
        build_extractor_for_inference(OmegaConf.create(RESNET), evil)
    assert not marker.exists()


def test_a_plain_weights_file_is_loaded_into_the_extractor(tmp_path):
    torch.manual_seed(0)
    source = build_extractor(OmegaConf.create(RESNET))
    as_extractor, as_backbone = tmp_path / "extractor.pth", tmp_path / "backbone.pth"
    torch.save(source.state_dict(), as_extractor)
    backbone = {k[len("model."):]: v for k, v in source.state_dict().items()}
    backbone["fc.weight"], backbone["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)  # removed by remove_fc
    torch.save(backbone, as_backbone)

    for path in (as_extractor, as_backbone):
        torch.manual_seed(1)  # another random init: only the file can make the weights equal
        built = build_extractor(OmegaConf.create({**RESNET, "weights": str(path)}))
        assert _same_weights(built, source), path

    other = tmp_path / "resnet50.pth"
    torch.save(build_extractor(OmegaConf.create({**RESNET, "arch": "resnet50"})).state_dict(), other)
    with pytest.raises(ConfigError, match="does not match the configured extractor"):
        build_extractor(OmegaConf.create({**RESNET, "weights": str(other)}))


# ----------------------------------------------------------------------------------------------------------------------
# the architecture stored in a checkpoint


def _checkpoint(path: Path, extractor_cfg, state_dict=None) -> Path:
    torch.save({"state_dict": state_dict or {}, CHECKPOINT_META_KEY: {"extractor_cfg": extractor_cfg}}, path)
    torch.load(path, weights_only=True)  # the attack needs no pickles: the file passes torch's weights-only load
    return path


@pytest.mark.parametrize("crafted", [
    lambda marker: {"_target_": "builtins.open", "file": str(marker), "mode": "w"},
    lambda marker: {**RESNET, "gem_p": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}},
    lambda marker: {**RESNET, "arch": {"_target_": "builtins.open", "file": str(marker), "mode": "w"}},
    lambda marker: {**RESNET, "weights": {"_target_": "torch.load", "f": str(marker), "weights_only": False}},
], ids=["top-level", "nested-gem_p", "nested-arch", "nested-torch-load"])
def test_a_crafted_stored_architecture_is_refused_and_never_runs(tmp_path, crafted):
    marker = tmp_path / "marker.txt"
    ckpt = _checkpoint(tmp_path / "crafted.ckpt", crafted(marker))
    with pytest.raises(ConfigError, match=r"crafted\.ckpt: the stored extractor .*extractor_from_ckpt=false"):
        build_extractor_for_inference(OmegaConf.create(RESNET), ckpt)
    with pytest.raises(ConfigError, match=r"crafted\.ckpt: the stored extractor"):
        load_extractor(OmegaConf.create({"extractor": RESNET, "ckpt": str(ckpt), "device": "cpu"}))
    assert not marker.exists()


def test_the_stored_architecture_check():
    assert checked_architecture(RESNET, "x") == RESNET  # what training writes (and wrote before) passes unchanged
    by_module = {**RESNET, "_target_": "oml.models.resnet.extractor.ResnetExtractor"}
    assert checked_architecture(by_module, "x")["_target_"] == "oml.models.ResnetExtractor"
    by_class = {"class": "oml.models.ViTExtractor", "arch": "vits16", "normalise_features": True}
    assert checked_architecture(by_class, "x") == {"_target_": "oml.models.ViTExtractor", "arch": "vits16",
                                                   "normalise_features": True}
    assert checked_architecture({**RESNET, "gem_p": 3}, "x")["gem_p"] == 3
    for bad, message in [({**RESNET, "_target_": "torch.nn.Linear"}, "class 'torch.nn.Linear' is not one"),
                         ({**RESNET, "in_features": 3}, "argument 'in_features' is not one"),
                         ({**RESNET, "remove_fc": 1}, "remove_fc=1 is not a plain bool"),
                         ({**RESNET, "gem_p": True}, "gem_p=True is not a plain"),
                         ({**RESNET, "arch": ["resnet18"]}, "arch=\\['resnet18'\\] is not a plain str"),
                         (["oml.models.ResnetExtractor"], "is a list, not a mapping")]:
        with pytest.raises(ConfigError, match=f"^ckpt.pth: .*{message}"):
            checked_architecture(bad, "ckpt.pth")


def test_a_checkpoint_written_by_the_previous_code_still_loads(tmp_path):
    torch.manual_seed(0)
    trained = build_extractor(OmegaConf.create(RESNET))
    state = {f"extractor.{k}": v for k, v in trained.state_dict().items()}
    ckpt = _checkpoint(tmp_path / "old.ckpt", {**RESNET, "weights": "resnet18_imagenet1k_v1"}, state)
    # the config asks for another architecture: the checkpoint's (with its weights, no download) is built
    model, _, node = build_extractor_for_inference(OmegaConf.create({**RESNET, "arch": "resnet50"}), ckpt)
    assert node.arch == "resnet18" and node.weights is None and _same_weights(model, trained)


# ----------------------------------------------------------------------------------------------------------------------
# the predict cache


class Gallery:
    def __init__(self, seed: int):
        rng = np.random.default_rng(seed)
        self.embeddings = rng.normal(size=(30, 8)).astype(np.float32)
        self.table = pd.DataFrame({"path": [f"img{i}.png" for i in range(30)], "label": np.arange(30) % 5,
                                   "class_name": [f"c{i % 5}" for i in range(30)]})
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.embeddings, self.table


def test_a_tampered_gallery_csv_is_noticed_and_rebuilt(tmp_path, caplog):
    gallery = Gallery(0)
    entry = load_or_build_gallery(gallery, {"k": 1}, IndexSpec(), tmp_path).cache_dir
    csv = entry / "gallery.csv"
    tampered = pd.read_csv(csv)
    tampered["label"] = 4 - tampered["label"]  # still a valid table: only the digest tells
    tampered.to_csv(csv, index=False)
    with caplog.at_level(logging.WARNING):
        again = load_or_build_gallery(gallery, {"k": 1}, IndexSpec(), tmp_path)
    assert gallery.calls == 2 and not again.embeddings_from_cache
    assert f"{csv} does not match the sha256" in caplog.text
    assert again.table["label"].tolist() == gallery.table["label"].tolist()
    assert pd.read_csv(csv)["label"].tolist() == gallery.table["label"].tolist()  # the entry was rewritten
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = load_or_build_gallery(gallery, {"k": 1}, IndexSpec(), tmp_path)
    assert gallery.calls == 2 and third.embeddings_from_cache and third.index_from_cache and not caplog.text


def test_a_swapped_index_is_noticed_and_rebuilt(tmp_path, caplog):
    spec = IndexSpec()
    ours, theirs = Gallery(0), Gallery(1)  # same shapes: faiss's own checks cannot tell the indexes apart
    entry = load_or_build_gallery(ours, {"k": "ours"}, spec, tmp_path).cache_dir
    other = load_or_build_gallery(theirs, {"k": "theirs"}, spec, tmp_path).cache_dir
    index_file = next(entry.glob("index-*.faiss"))
    shutil.copyfile(other / index_file.name, index_file)

    with caplog.at_level(logging.WARNING):
        loaded = load_or_build_gallery(ours, {"k": "ours"}, spec, tmp_path)
    assert f"cached index {index_file} does not match the sha256" in caplog.text
    assert ours.calls == 1 and loaded.embeddings_from_cache and not loaded.index_from_cache
    queries = ours.embeddings[:6] + 0.01
    expected = search(build_index(ours.embeddings, spec), spec, queries, 3)[1]
    np.testing.assert_array_equal(loaded.search(queries, 3)[1], expected)
    assert expected[:, 0].tolist() == list(range(6))
    recorded = json.loads((entry / "meta.json").read_text())["sha256"]
    assert set(recorded) == {"embeddings.npy", "gallery.csv", index_file.name}
    assert load_or_build_gallery(ours, {"k": "ours"}, spec, tmp_path).index_from_cache  # the rebuilt one is trusted
