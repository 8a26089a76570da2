"""Freezing: BatchNorm in eval mode, only named sub-modules trainable, the backbone frozen around a head.

OML has none of this that works under Lightning 2: no BatchNorm handling, and ``ExtractorModule(freeze_n_epochs=...)``
lives in a PL 1.x hook that Lightning 2 never calls. The per-epoch schedule (``freeze_n_epochs``) is the
``FreezeBackbone`` callback in ``metriclab.training.callbacks``; this module holds the pure helpers it uses.

How a BatchNorm layer stays frozen: it carries a set of reasons (``freeze_bn``, ``set_trainable``,
``freeze_backbone``) and a forward pre-hook that switches it to eval mode while the set is non-empty, so running
statistics never update even if ``model.train()`` ran after freezing (Lightning calls it after every validation);
its affine parameters get ``requires_grad=False``. ``keep_frozen_bn_in_eval(module)`` re-applies eval mode right
away, for code that inspects ``.training`` (call it in ``on_train_epoch_start``). The hook and the reasons travel with
``copy.deepcopy`` and pickling (module-level function, a set of strings), and the ``state_dict`` is unchanged.
Converting to SyncBatchNorm after freezing builds new layers without them: freeze after any such conversion.

Optimizers: a parameter with ``requires_grad=False`` keeps ``grad=None``, and torch optimizers skip such parameters
entirely (no weight decay, no momentum), so frozen weights stay bit-identical even inside the optimizer's groups.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, List, Optional, Sequence, Set

from torch import nn

#: every BatchNorm layer torch has (their common base class is private)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.LazyBatchNorm1d,
                   nn.LazyBatchNorm2d, nn.LazyBatchNorm3d)

log = logging.getLogger(__name__)

_REASONS_ATTR = "_metriclab_bn_frozen_by"
REASON_FREEZE_BN = "freeze_bn"
REASON_SET_TRAINABLE = "set_trainable"
REASON_FREEZE_BACKBONE = "freeze_backbone"


def _keep_bn_eval_hook(module: nn.Module, args: tuple) -> None:
    if getattr(module, _REASONS_ATTR, None):
        module.train(False)


def batchnorm_layers(module: nn.Module) -> List[nn.Module]:
    return [m for m in module.modules() if isinstance(m, BATCHNORM_TYPES)]


def freeze_bn_layer(bn: nn.Module, reason: str) -> None:
    reasons: Optional[Set[str]] = getattr(bn, _REASONS_ATTR, None)
    if reasons is None:
        reasons = set()
        setattr(bn, _REASONS_ATTR, reasons)
        bn.register_forward_pre_hook(_keep_bn_eval_hook)
    reasons.add(reason)
    bn.train(False)
    for param in bn.parameters(recurse=False):
        param.requires_grad_(False)


def unfreeze_bn_layer(bn: nn.Module, reason: str, training: bool) -> None:
    """Drop one reason; if none is left, the layer trains again (affine params trainable, mode = `training`)."""
    reasons: Optional[Set[str]] = getattr(bn, _REASONS_ATTR, None)
    if reasons is None:
        return
    reasons.discard(reason)
    if not reasons:
        bn.train(training)
        for param in bn.parameters(recurse=False):
            param.requires_grad_(True)


def is_bn_frozen(bn: nn.Module) -> bool:
    return bool(getattr(bn, _REASONS_ATTR, None))


def freeze_batchnorm(module: nn.Module) -> int:
    """Freeze every BatchNorm layer of `module` for good (eval mode, statistics and affine params fixed).

    Returns the number of layers frozen (0 for a ViT, whose norms are LayerNorms without running statistics).
    """
    layers = batchnorm_layers(module)
    for bn in layers:
        freeze_bn_layer(bn, REASON_FREEZE_BN)
    if layers:
        log.info("freeze_bn: %d BatchNorm layers frozen (eval mode, statistics and affine params fixed)", len(layers))
    else:
        log.warning("freeze_bn: no BatchNorm layer in %s, nothing to freeze", type(module).__name__)
    return len(layers)


def keep_frozen_bn_in_eval(module: nn.Module) -> None:
    """Put the frozen BatchNorm layers back in eval mode now (after `module.train()`); the forward hook also does it."""
    for bn in batchnorm_layers(module):
        if is_bn_frozen(bn):
            bn.train(False)


def _inner_model_names(module: nn.Module) -> List[str]:
    """Top-level children that wrap a network (OML extractors keep theirs as `.model`), for relative names."""
    return [name for name, child in module.named_children() if len(list(child.children())) > 0]


def resolve_submodule_names(module: nn.Module, names: Iterable[str]) -> List[str]:
    """Map user names to dotted names of `module`: absolute ("model.layer4") or relative to a wrapped network
    ("layer4" -> "model.layer4" for OML's ResnetExtractor, "blocks.11" / "norm" for ViTExtractor)."""
    available = dict(module.named_modules())
    wrappers = _inner_model_names(module)
    resolved = []
    for name in names:
        name = str(name).strip()
        if name and name in available:
            resolved.append(name)
            continue
        candidates = [f"{wrapper}.{name}" for wrapper in wrappers if f"{wrapper}.{name}" in available]
        if len(candidates) == 1:
            resolved.append(candidates[0])
        elif len(candidates) > 1:
            raise ValueError(f"sub-module name {name!r} is ambiguous: it matches {candidates}; use the dotted name")
        else:
            top = [n for n, _ in module.named_children()]
            inner = "; ".join(
                f"inside `{w}`: {', '.join(n for n, _ in getattr(module, w).named_children())}" for w in wrappers
            )
            raise ValueError(
                f"unknown sub-module name {name!r} for {type(module).__name__}. Valid top-level names: "
                f"{', '.join(top)}" + (f"; {inner}" if inner else "") + " (deeper names like `layer4.1` work too)"
            )
    return resolved


def params_under(module: nn.Module, prefixes: Sequence[str]) -> Set[int]:
    """ids of the parameters of `module`'s sub-modules named by `prefixes` (resolved dotted names)."""
    ids: Set[int] = set()
    for prefix in prefixes:
        ids.update(id(p) for p in module.get_submodule(prefix).parameters())
    return ids


def modules_under(module: nn.Module, prefixes: Sequence[str]) -> Set[int]:
    """ids of the sub-modules named by `prefixes` and of every module inside them."""
    return {id(m) for prefix in prefixes for m in module.get_submodule(prefix).modules()}


def set_trainable(module: nn.Module, names: Optional[Sequence[str]]) -> List[str]:
    """Make only the named sub-modules trainable; everything else is frozen, BatchNorm statistics included.

    ``names=None``: everything trainable (except layers frozen by ``freeze_batchnorm``). ``names=[]``: nothing in
    `module` trains (only the loss would). Returns the resolved dotted names.
    """
    if names is None:
        for param in module.parameters():
            param.requires_grad_(True)
        for bn in batchnorm_layers(module):
            unfreeze_bn_layer(bn, REASON_SET_TRAINABLE, training=module.training)
        refreeze_bn_params(module)
        return []
    if isinstance(names, str):
        names = [names]
    resolved = resolve_submodule_names(module, names)
    trainable_ids = params_under(module, resolved)
    trainable_bn_ids = modules_under(module, resolved)
    for param in module.parameters():
        param.requires_grad_(id(param) in trainable_ids)
    for bn in batchnorm_layers(module):
        if id(bn) in trainable_bn_ids:
            unfreeze_bn_layer(bn, REASON_SET_TRAINABLE, training=module.training)
        else:
            freeze_bn_layer(bn, REASON_SET_TRAINABLE)
    refreeze_bn_params(module)
    n_trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in module.parameters())
    if n_trainable == 0:
        log.warning("trainable=%s: these sub-modules have no parameters, the whole extractor is frozen", resolved)
    log.info("trainable=%s: %d of %d extractor parameters train", resolved, n_trainable, n_total)
    return resolved


def refreeze_bn_params(module: nn.Module) -> None:
    """BN layers frozen for any reason keep requires_grad=False, whatever order the freezing calls came in."""
    for bn in batchnorm_layers(module):
        if is_bn_frozen(bn):
            for param in bn.parameters(recurse=False):
                param.requires_grad_(False)


def freeze_backbone(module: nn.Module, head: Sequence[str]) -> Dict[str, bool]:
    """Freeze `module` except its `head` sub-modules (resolved dotted names): parameters get requires_grad=False,
    BatchNorm layers outside the head are held in eval mode. Returns each parameter's previous requires_grad, for
    `unfreeze_backbone`."""
    head_param_ids = params_under(module, head)
    head_module_ids = modules_under(module, head)
    saved = {name: p.requires_grad for name, p in module.named_parameters()}
    for param in module.parameters():
        if id(param) not in head_param_ids:
            param.requires_grad_(False)
    for bn in batchnorm_layers(module):
        if id(bn) not in head_module_ids:
            freeze_bn_layer(bn, REASON_FREEZE_BACKBONE)
    return saved


def unfreeze_backbone(module: nn.Module, saved: Dict[str, bool]) -> None:
    """Undo `freeze_backbone` exactly: `set_trainable` and `freeze_batchnorm` choices made before it survive."""
    for bn in batchnorm_layers(module):
        unfreeze_bn_layer(bn, REASON_FREEZE_BACKBONE, training=module.training)
    for name, param in module.named_parameters():
        param.requires_grad_(saved.get(name, param.requires_grad))
    refreeze_bn_params(module)


__all__ = [
    "freeze_batchnorm",
    "keep_frozen_bn_in_eval",
    "set_trainable",
    "resolve_submodule_names",
    "params_under",
    "is_bn_frozen",
    "batchnorm_layers",
    "freeze_bn_layer",
    "unfreeze_bn_layer",
    "modules_under",
    "refreeze_bn_params",
    "freeze_backbone",
    "unfreeze_backbone",
    "REASON_FREEZE_BN",
    "REASON_SET_TRAINABLE",
    "REASON_FREEZE_BACKBONE",
]
