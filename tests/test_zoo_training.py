"""Every OML zoo extractor config trains one epoch: random init, generated data (real digit scans), one n x k batch,
the real `train(cfg)` with validation and checkpoints.

What "trained" means here, checked in the checkpoint and the run: one optimizer step was taken (global_step 1,
SGD's momentum buffers non-zero: gradients reached the weights; SGD rather than Adam keeps a 300M-parameter
checkpoint at 2x the weights, not 3x), validation produced finite
metrics, and best.ckpt stores the zoo key's architecture and embedding size.

Input side: a ViT that interpolates its position embeddings and every ResNet train at a small side (64 px; 56 px
for patch-14 models); CLIP and UNICOM ViTs only run at their stated size. Configs that differ only in `weights`
(e.g. openai_/sber_ CLIP pairs, the vits16_{dino,cars,cub,inshop} family) build the same network from random init:
one of each group trains, and a test asserts the others are that config with other weights. The seven above 150M
parameters (DINOv2 ViT-L/14 x2, CLIP ViT-L/14 x2, UNICOM ViT-B/16, ViT-L/14, ViT-L/14-336: 0.2-0.9 B parameters,
checkpoints of 1-4 GB) take from a minute to several each on a 2-core CPU: they are marked `zoo_heavy` and run by
`make test-zoo`, not by `make test`. They train their last block (the config's own `trainable` example): the
gradients and momentum of 0.9 B parameters do not fit beside the weights in 24 GB.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from metriclab.core.checkpoint import CheckpointMeta
from metriclab.core.paths import CONFIGS_DIR
from metriclab.jobs.train import train
from tests.helpers import compose_cfg, fast_overrides, write_tiny_dataset

FOLDER = CONFIGS_DIR / "extractor"
HEADER = re.compile(r"^# OML zoo key (\S+) \((\S+), ([\d.]+)M parameters\)", re.MULTILINE)
STATED = re.compile(r"^# embedding size: (\d+) \| input size: (\d+)x(\d+) \(([^)]*)\)", re.MULTILINE)
HEAVY_PARAMS_M = 150.0
#: the `trainable` example each generated config states in its comment (its last block)
TRAINABLE_EXAMPLE = re.compile(r"^trainable: null\s+#.*e\.g\. (\[[^\]]+\])", re.MULTILINE)


def zoo_configs():
    """(key, params in millions, embedding size, stated side, fixed size?) of every generated zoo config."""
    found = []
    for path in sorted(FOLDER.glob("*.yaml")):
        text = path.read_text(encoding="utf-8")
        head, sizes = HEADER.search(text), STATED.search(text)
        if head is None:
            continue
        assert sizes, f"{path} states no sizes"
        found.append((head[1], float(head[3]), int(sizes[1]), int(sizes[2]), "fixed" in sizes[4]))
    return found


def side_for(key: str, stated: int, fixed: bool) -> int:
    if fixed:
        return stated
    return 56 if "14" in key else 64  # patch 14 needs a multiple of 14; 8, 16 and 32 divide 64


def network_of(key: str) -> tuple:
    """What a config builds from random init: every key but `weights`."""
    node = OmegaConf.to_container(OmegaConf.load(FOLDER / f"{key}.yaml"))
    return tuple(sorted((k, repr(v)) for k, v in node.items() if k != "weights"))


def representatives() -> dict:
    """network -> the first zoo key (by name) that builds it."""
    found: dict = {}
    for key, *_ in zoo_configs():
        found.setdefault(network_of(key), key)
    return found


def last_block(key: str) -> str:
    found = TRAINABLE_EXAMPLE.search((FOLDER / f"{key}.yaml").read_text(encoding="utf-8"))
    assert found, f"{key}.yaml states no trainable example"
    return found[1].replace(" ", "")


def cases():
    trained = set(representatives().values())
    out = []
    for key, params_m, emb, stated, fixed in zoo_configs():
        if key not in trained:
            continue
        heavy = params_m > HEAVY_PARAMS_M
        marks = [pytest.mark.zoo_heavy] if heavy else [pytest.mark.slow]
        out.append(pytest.param(key, emb, side_for(key, stated, fixed), heavy, id=key, marks=marks))
    return out


def test_every_generated_zoo_config_is_trained_or_the_same_network_as_one_that_is():
    keys = {p.stem for p in FOLDER.glob("*.yaml") if HEADER.search(p.read_text(encoding="utf-8"))}
    assert len(keys) >= 31 and {key for key, *_ in zoo_configs()} == keys
    reps = representatives()
    trained = {case.values[0] for case in cases()}
    for key in keys:
        rep = reps[network_of(key)]
        assert rep in trained
        if rep != key:  # the same class and arguments; only the weights to load differ
            ours, theirs = (OmegaConf.load(FOLDER / f"{k}.yaml") for k in (key, rep))
            assert ours.weights != theirs.weights and network_of(key) == network_of(rep)
    assert reps[network_of("sber_vitb16_224")] == "openai_vitb16_224"  # a pair the registry holds
    heavy = {key for key, params_m, *_ in zoo_configs() if params_m > HEAVY_PARAMS_M}
    assert heavy == {"vitl14_dinov2", "vitl14_reg_dinov2", "openai_vitl14_224", "sber_vitl14_224", "vitb16_unicom",
                     "vitl14_unicom", "vitl14_336px_unicom"}


@pytest.mark.parametrize("key, embedding_size, side, heavy", cases())
def test_zoo_config_trains_one_epoch(tmp_path, key, embedding_size, side, heavy):
    root = tmp_path / "data"
    write_tiny_dataset(root, n_train_classes=2, n_val_classes=2, per_class=2)
    cfg = compose_cfg("train", fast_overrides(tmp_path, root) + [
        f"extractor={key}", "extractor.weights=null", f"transforms.train.im_size={side}",
        f"transforms.val.im_size={side}", "sampler.n_labels=2", "sampler.n_instances=2", "batch_size_val=4",
        "logger=tensorboard", "trainer.num_sanity_val_steps=0", "optimizer=sgd",
        "optimizer.lr=1e-4",  # a random-init ResNet152 at SGD's 1e-2 leaves float32 range in one step
        *([f"extractor.trainable={last_block(key)}"] if heavy else [])])
    result = train(cfg)
    ckpt = torch.load(Path(result["best_ckpt"]), map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (0, 1)
    stored = CheckpointMeta.from_checkpoint(ckpt).extractor_cfg
    assert stored["arch"] == str(cfg.extractor.arch) and stored["_target_"] == str(cfg.extractor._target_)
    assert stored.get("weights") is None
    # SGD's momentum buffers: one per parameter that got a gradient, non-zero where the gradient was
    buffers = [s["momentum_buffer"] for s in ckpt["optimizer_states"][0]["state"].values()]
    assert buffers and sum(bool(b.abs().sum() > 0) for b in buffers) >= len(buffers) // 2  # gradients arrived
    assert 0.0 <= result["metrics"]["mAP"] <= 1.0 and math.isfinite(result["metrics"]["eer"])
    assert any(k.startswith("extractor.") for k in ckpt["state_dict"]), "the checkpoint holds the extractor"
    assert result["embedding_size"] == embedding_size  # what validation embedded: the size the config states
