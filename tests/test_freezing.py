"""Freezing: frozen parameters and BatchNorm statistics stay bit-identical through optimizer steps (SGD with
momentum and weight decay, AdamW), trainable ones change; names resolve for OML's ResNet and ViT extractors."""
import copy
import pickle
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from oml.models import ResnetExtractor, ViTExtractor
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from metriclab.models.freezing import (
    freeze_batchnorm,
    is_bn_frozen,
    keep_frozen_bn_in_eval,
    resolve_submodule_names,
    set_trainable,
)
from metriclab.models.losses import SoftmaxLoss
from metriclab.training.callbacks import FreezeBackbone

torch.set_num_threads(1)


def _resnet(seed=0):
    torch.manual_seed(seed)
    return ResnetExtractor(weights=None, arch="resnet18", gem_p=None, remove_fc=True, normalise_features=False)


def _snapshot(module):
    """Parameters and buffers (BN running_mean/var/num_batches_tracked) by name, cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train_steps(model, n_steps=3, optimizer="sgd", call_train_between=True, seed=1):
    model.train()
    params = list(model.parameters())  # every parameter, frozen ones included: the optimizer must skip them
    if optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    else:
        opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.05)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n_steps):
        if call_train_between:
            model.train()  # what Lightning does after every validation
        images = torch.randn(4, 3, 32, 32, generator=gen)
        loss = model(images).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _changed(before, after):
    return {k for k in before if not torch.equal(before[k], after[k])}


def _is_bn_key(model, key):
    owner = model.get_submodule(key.rsplit(".", 1)[0])
    return isinstance(owner, nn.BatchNorm2d)


def _bns(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_freeze_batchnorm_puts_every_bn_in_eval_mode_at_once():
    """Checked before any forward: the forward pre-hook would otherwise hide a freeze that left train mode on."""
    model = _resnet()
    model.train()
    freeze_batchnorm(model)
    assert len(_bns(model)) == 20
    assert all(not bn.training for bn in _bns(model))
    assert all(not p.requires_grad for bn in _bns(model) for p in bn.parameters())
    assert model.training and model.model.layer1.training and model.model.conv1.weight.requires_grad


def test_set_trainable_puts_the_frozen_bns_in_eval_mode_at_once():
    """Checked before any forward, as above: BNs outside the trainable blocks are in eval mode, the others train."""
    model = _resnet()
    model.train()
    set_trainable(model, ["layer4"])
    inside = _bns(model.model.layer4)
    outside = [bn for bn in _bns(model) if all(bn is not b for b in inside)]
    assert len(inside) == 5 and len(outside) == 15  # layer4: 2 blocks x 2 BNs + the downsample BN
    assert all(not bn.training and not bn.weight.requires_grad and not bn.bias.requires_grad for bn in outside)
    assert all(bn.training and bn.weight.requires_grad for bn in inside)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_freeze_batchnorm_keeps_stats_and_affine_bit_identical(optimizer):
    model = _resnet()
    assert freeze_batchnorm(model) == 20  # resnet18: bn1 + 2 per basic block x 8 + 3 downsample BNs
    before = _snapshot(model)
    _train_steps(model, optimizer=optimizer)
    changed = _changed(before, _snapshot(model))
    bn_keys = {k for k in before if _is_bn_key(model, k)}
    assert len(bn_keys) == 20 * 5  # weight, bias, running_mean, running_var, num_batches_tracked
    assert not changed & bn_keys
    conv_keys = {k for k in before if k.endswith("conv1.weight") or k.endswith("conv2.weight")}
    assert conv_keys <= changed  # gradients still flow through the frozen BNs into every conv
    assert all(not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.training and model.model.layer1.training  # only the BNs are in eval mode


def test_frozen_bn_stays_in_eval_after_train_and_survives_copies():
    model = _resnet()
    freeze_batchnorm(model)
    model.train()
    assert model.model.bn1.training  # .train() flips the flag ...
    keep_frozen_bn_in_eval(model)
    assert not model.model.bn1.training  # ... and this flips it back (the LightningModule's epoch-start call)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        clone.train()
        before = _snapshot(clone)
        with torch.no_grad():
            clone(torch.randn(4, 3, 32, 32))
        assert not _changed(before, _snapshot(clone))  # the forward hook kept the statistics fixed
        assert not clone.model.bn1.training and is_bn_frozen(clone.model.bn1)


def test_set_trainable_only_named_blocks_change():
    model = _resnet()
    assert set_trainable(model, ["layer4"]) == ["model.layer4"]
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(before, _snapshot(model))
    layer4 = {k for k in before if k.startswith("model.layer4.")}
    assert changed <= layer4  # everything outside layer4, BN running statistics included, is bit-identical
    assert {k for k in layer4 if k.endswith(("conv1.weight", "running_mean", "running_var"))} <= changed
    assert not is_bn_frozen(model.model.layer4[0].bn1) and is_bn_frozen(model.model.layer3[0].bn1)


def test_set_trainable_name_forms_and_errors():
    model = _resnet()
    assert resolve_submodule_names(model, ["layer4", "model.layer3", "fc", "layer4.1.bn2"]) == [
        "model.layer4", "model.layer3", "model.fc", "model.layer4.1.bn2"]
    expected = (r"unknown sub-module name 'layer5'.*Valid top-level names: model; inside `model`: "
                r"conv1, bn1, relu, maxpool, layer1, layer2, layer3, layer4, avgpool, fc")
    with pytest.raises(ValueError, match=expected):
        set_trainable(model, ["layer4", "layer5"])
    assert all(p.requires_grad for p in model.parameters())  # a bad name changes nothing
    set_trainable(model, ["fc"])  # remove_fc=True: fc is an Identity without parameters -> everything frozen
    assert not any(p.requires_grad for p in model.parameters())
    set_trainable(model, None)
    assert all(p.requires_grad for p in model.parameters())
    assert not any(is_bn_frozen(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize("order", ["freeze_bn_first", "set_trainable_first"])
def test_freeze_bn_and_set_trainable_combine_in_any_order(order):
    model = _resnet()
    if order == "freeze_bn_first":
        freeze_batchnorm(model)
        set_trainable(model, ["layer4"])
    else:
        set_trainable(model, ["layer4"])
        freeze_batchnorm(model)
    before = _snapshot(model)
    _train_steps(model)
    changed = _changed(before, _snapshot(model))
    # exactly layer4's convolutions (and its downsample conv) changed: no BN anywhere, nothing outside layer4
    assert changed == {k for k in before if k.startswith("model.layer4.") and not _is_bn_key(model, k)}
    assert len(changed) == 5
    set_trainable(model, None)  # all trainable again, but freeze_bn still holds
    assert all(is_bn_frozen(m) and not m.weight.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert model.model.conv1.weight.requires_grad


def test_vit_names_resolve_inside_the_wrapped_model():
    torch.manual_seed(0)
    vit = ViTExtractor(weights=None, arch="vits16", normalise_features=False)
    assert freeze_batchnorm(vit) == 0  # LayerNorms only: nothing to freeze
    assert set_trainable(vit, ["blocks.11", "norm"]) == ["model.blocks.11", "model.norm"]
    trainable = {n.split(".")[1] + ("." + n.split(".")[2] if n.startswith("model.blocks") else "")
                 for n, p in vit.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.11", "norm"}
    with pytest.raises(ValueError, match="inside `model`: patch_embed, pos_drop, blocks, norm, head"):
        set_trainable(vit, ["layer4"])


class _TinyModule(pl.LightningModule):
    def __init__(self, extractor, criterion):
        super().__init__()
        self.extractor, self.criterion = extractor, criterion
        self.snapshots = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return self.criterion(self.extractor(images), labels)

    def validation_step(self, batch, batch_idx):  # Lightning calls .train() after it: frozen BNs must not care
        self.extractor(batch[0])

    def on_train_epoch_end(self):
        self.snapshots.append((_snapshot(self.extractor), _snapshot(self.criterion)))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]  # FreezeBackbone acts after this
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def test_freeze_backbone_callback_in_a_real_trainer():
    """freeze_n_epochs=2: epochs 0-1 only the head (layer4) and the loss train, epoch 2 everything."""
    model = _resnet()
    criterion = SoftmaxLoss(num_classes=3, embedding_size=512, bnneck=False)
    module = _TinyModule(model, criterion)
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(8, 3, 32, 32, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    loader = DataLoader(data, batch_size=4)
    callback = FreezeBackbone(n_epochs=2, head=["layer4"])
    before = _snapshot(model)
    criterion_before = _snapshot(criterion)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                         num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    assert len(module.snapshots) == 3
    for epoch in (0, 1):
        extractor_after, criterion_after = module.snapshots[epoch]
        changed = _changed(before, extractor_after)
        assert changed and all(k.startswith("model.layer4.") for k in changed), epoch  # BN stats outside too
        assert _changed(criterion_before, criterion_after) == {"classifier.weight"}
    changed_last = _changed(module.snapshots[1][0], module.snapshots[2][0])
    assert {"model.conv1.weight", "model.bn1.running_mean", "model.layer1.0.conv1.weight"} <= changed_last
    assert not callback.is_frozen and all(p.requires_grad for p in model.parameters())
    assert model.model.bn1.training  # unfrozen BN is back in train mode


def test_freeze_backbone_restores_set_trainable_and_freeze_bn_choices():
    model = _resnet()
    set_trainable(model, ["layer3", "layer4"])
    freeze_batchnorm(model)
    model.train()
    expected = {n: p.requires_grad for n, p in model.named_parameters()}
    callback = FreezeBackbone(n_epochs=1, head="layer4")
    module = SimpleNamespace(extractor=model)
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=0), module)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.layer4.") and ".bn" not in n for n in trainable)
    assert all(not p.requires_grad for p in model.model.layer3.parameters())
    callback.on_train_epoch_start(SimpleNamespace(current_epoch=1), module)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected
    assert all(is_bn_frozen(m) and not m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    # a resumed run that starts after the frozen epochs does not freeze anything
    resumed = FreezeBackbone(n_epochs=1, head=None)
    resumed.on_train_epoch_start(SimpleNamespace(current_epoch=5), module)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == expected


def test_freeze_backbone_errors():
    with pytest.raises(ValueError, match="freeze_n_epochs must be an integer >= 0"):
        FreezeBackbone(n_epochs=-1)
    callback = FreezeBackbone(n_epochs=1, head=["head5"])
    with pytest.raises(ValueError, match="unknown sub-module name 'head5'"):
        callback.setup(None, SimpleNamespace(extractor=_resnet()), "fit")
    with pytest.raises(AttributeError, match=r"no extractor attribute among \['extractor', 'model'\]"):
        FreezeBackbone(n_epochs=1).on_train_epoch_start(SimpleNamespace(current_epoch=0), SimpleNamespace())


def test_freeze_backbone_under_ddp_needs_find_unused_parameters():
    from pytorch_lightning.strategies import DDPStrategy

    module = SimpleNamespace(extractor=_resnet())
    with pytest.raises(ValueError, match="find_unused_parameters=True"):
        FreezeBackbone(n_epochs=1).setup(SimpleNamespace(strategy=DDPStrategy()), module, "fit")
    FreezeBackbone(n_epochs=1).setup(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)), module, "fit")
    FreezeBackbone(n_epochs=0).setup(SimpleNamespace(strategy=DDPStrategy()), module, "fit")  # never freezes
