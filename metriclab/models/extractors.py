"""Build extractors from config (with checks OML does not make) and load their weights from our checkpoints.

The `extractor` group names an OML extractor, `ViTWithMLPExtractor` below (OML's ExtractorWithMLP from plain
values) or `metriclab.models.timm_extractor.TimmExtractor`; configs/extractor/<OML zoo key>.yaml are generated from
OML's registry by scripts/make_zoo_configs.py."""
from __future__ import annotations

import pickle
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from oml.models import ViTExtractor
from oml.models.meta.projection import ExtractorWithMLP

from metriclab.core.checkpoint import CheckpointMeta, checked_architecture
from metriclab.core.config import build, build_plain
from metriclab.core.errors import ConfigError


@dataclass
class ExtractorTrainingOptions:
    """The keys of the `extractor` group that configure training, not the extractor's constructor: the one place
    they are declared. Everything else in the group goes to the constructor (`_target_`)."""

    freeze_bn: bool = False  #: keep BatchNorm statistics and affine params fixed
    trainable: Optional[List[str]] = None  #: sub-modules that train; None = all


#: their names, removed before the constructor is built
TRAINING_KEYS = tuple(f.name for f in fields(ExtractorTrainingOptions))


class ViTWithMLPExtractor(ExtractorWithMLP):
    """OML's ExtractorWithMLP around a ViTExtractor, built from plain values: OML's class takes an extractor object,
    which neither a YAML config nor a checkpoint's stored architecture can hold. The zoo key
    `vits16_224_mlp_384_inshop` goes through OML's download; its state dict keys are OML's (`extractor.model.*`,
    `projection.*`)."""

    constructors = ViTExtractor.constructors  # `arch` names the inner ViT

    def __init__(self, weights: Optional[str], arch: str, mlp_features: List[int], normalise_features: bool = False,
                 use_multi_scale: bool = False, train_backbone: bool = True):
        vit = ViTExtractor(None, arch, normalise_features, use_multi_scale=use_multi_scale)
        super().__init__(vit, [int(f) for f in mlp_features], weights=weights, train_backbone=train_backbone)


def extractor_constructor_cfg(node: DictConfig) -> DictConfig:
    """The constructor part of the `extractor` node (training keys removed)."""
    cfg = OmegaConf.to_container(node, resolve=True)
    assert isinstance(cfg, dict), f"the extractor config is a mapping, got {type(cfg).__name__}"
    for key in TRAINING_KEYS:
        cfg.pop(key, None)
    return OmegaConf.create(cfg)


def extractor_training_options(node: DictConfig, key: str = "extractor") -> ExtractorTrainingOptions:
    """The training part of the `extractor` node, type-checked (a wrong type names the key)."""
    values = {k: node[k] for k in TRAINING_KEYS if k in node}
    return build_plain(OmegaConf.create(values), key, ExtractorTrainingOptions)


def build_extractor(node: DictConfig, key: str = "extractor") -> torch.nn.Module:
    """The extractor the `extractor` node describes, built by `metriclab.core.config.build` (its class's signature is
    the schema), after checks OML makes with bare asserts or not at all (architecture name, weights). A local
    weights file is loaded here, weights-only (OML would unpickle it); zoo keys go through OML's download."""
    cfg = extractor_constructor_cfg(node)
    try:
        from hydra.utils import get_class

        cls = get_class(cfg._target_)
    except Exception as e:
        raise ConfigError(f"`{key}._target_={cfg.get('_target_')}` cannot be imported: {e}") from e
    archs = getattr(cls, "constructors", None)
    if "arch" in cfg and isinstance(archs, dict) and cfg.arch not in archs:  # OML asserts with no message
        raise ConfigError(f"`{key}.arch={cfg.arch}` is not supported by {cls.__name__}; choose one of {sorted(archs)}")
    weights = cfg.get("weights")
    zoo = getattr(cls, "pretrained_models", {}) or {}
    if isinstance(weights, str) and weights not in zoo and not Path(weights).is_file():
        raise ConfigError(f"`{key}.weights={weights}` is neither a zoo key of {cls.__name__} ({sorted(zoo)}) nor an "
                          f"existing file; use one of those, a checkpoint path, or `{key}.weights=null` (random init)")
    local_file = isinstance(weights, str) and weights not in zoo
    if local_file:  # OML would unpickle the file (weights_only=False): we load it weights-only ourselves
        cfg.weights = None
    try:
        extractor = build(cfg, key)
    except ConfigError as e:
        if isinstance(weights, str) and weights in zoo:
            raise ConfigError(f"`{key}.weights={weights}`: the pretrained weights could not be loaded ({e}). They "
                              f"are downloaded on first use: without network, put a local checkpoint path in "
                              f"`{key}.weights` or use `{key}.weights=null`") from e
        raise
    if local_file:
        _load_weights(extractor, load_checkpoint(weights), weights, weights_file=True)
    return extractor


def load_checkpoint(path: str | Path, *, mmap: bool = False) -> Dict[str, Any]:
    """Load a checkpoint safely (weights only where torch allows); a non-checkpoint file is a clear error.
    `mmap=True` maps the tensors instead of reading them (for callers that only need the metadata; zip-format
    files only)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":  # the hub's format (timm weights): tensors only by construction
        return _load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:  # what torch raises for anything beyond tensors and plain containers
        raise ConfigError(f"{path} needs pickled Python objects to load, which can run code, so it is refused; "
                          f"save plain tensors instead, e.g. torch.save(model.state_dict(), path)") from e
    except Exception as e:
        raise ConfigError(f"{path} is not a checkpoint torch can load (weights-only): {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _load_safetensors(path: Path) -> Dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a safetensors file: {type(e).__name__}: {e}") from e


def extractor_state_dict(ckpt: Dict[str, Any], own_keys: Optional[Any] = None) -> Dict[str, torch.Tensor]:
    """The extractor's weights from one of our Lightning checkpoints, or from a plain extractor state dict (kept as
    it is when its keys are exactly `own_keys`: OML's ExtractorWithMLP names its own backbone `extractor.`)."""
    sd = ckpt.get("state_dict", ckpt)
    if own_keys is not None and set(sd) == set(own_keys):
        return sd
    if any(k.startswith("extractor.") for k in sd):  # our LightningModule: drop the loss's own weights
        return {k[len("extractor."):]: v for k, v in sd.items() if k.startswith("extractor.")}
    return sd


def _weights_file_keys(extractor: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A weights file's keys as the extractor names them: OML's and timm extractors also accept their backbone's own
    state dict (no `model.` prefix), and drop the backbone's classifier (`remove_fc`, timm's `classifier` names)."""
    if hasattr(extractor, "model") and sd and not any(k.startswith("model.") for k in sd):
        sd = {f"model.{k}": v for k, v in sd.items()}
    heads = ["model.fc."] if getattr(extractor, "remove_fc", False) else []
    classifier = getattr(getattr(extractor, "model", None), "pretrained_cfg", {}).get("classifier")  # timm
    heads += [f"model.{name}." for name in ([classifier] if isinstance(classifier, str) else classifier or [])]
    if heads:
        ours = extractor.state_dict()
        sd = {k: v for k, v in sd.items() if k in ours or not any(k.startswith(h) for h in heads)}
    return sd


def _load_weights(extractor: torch.nn.Module, ckpt: Dict[str, Any], path: str | Path,
                  weights_file: bool = False) -> None:
    sd = extractor_state_dict(ckpt, own_keys=extractor.state_dict().keys())
    if weights_file:
        sd = _weights_file_keys(extractor, sd)
    try:
        missing, unexpected = extractor.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes differ: another architecture
        raise ConfigError(f"{path} does not match the configured extractor ({str(e).splitlines()[1].strip()}). Use "
                          f"the same `extractor` config as the training run") from e
    if missing or unexpected:
        raise ConfigError(f"{path} does not match the configured extractor: missing keys {missing[:5]}, unexpected "
                          f"keys {unexpected[:5]}. Use the same `extractor` config as the training run")


def load_extractor_weights(extractor: torch.nn.Module, path: str | Path) -> Dict[str, Any]:
    ckpt = load_checkpoint(path)
    _load_weights(extractor, ckpt, path)
    return ckpt


def build_extractor_for_inference(
    node: DictConfig, ckpt_path: Optional[str | Path] = None, extractor_from_ckpt: bool = True
) -> Tuple[torch.nn.Module, Dict[str, Any], DictConfig]:
    """The extractor validate/predict/explain run: without `ckpt_path`, `node` with its own weights (zoo key, file,
    or random init); with it, the checkpoint's weights on the architecture stored in our checkpoints (unless
    `extractor_from_ckpt=False`, then `node`'s). Returns (extractor, checkpoint dict or {}, the config built)."""
    if not ckpt_path:
        return build_extractor(node), {}, node
    ckpt = load_checkpoint(ckpt_path)  # read once: it can be hundreds of MB
    stored = CheckpointMeta.from_checkpoint(ckpt).extractor_cfg
    if stored and extractor_from_ckpt:  # the weights come from the checkpoint, not the zoo
        node = OmegaConf.create({**checked_architecture(stored, str(ckpt_path)), "weights": None})
    extractor = build_extractor(node)
    _load_weights(extractor, ckpt, ckpt_path)
    return extractor, ckpt, node
