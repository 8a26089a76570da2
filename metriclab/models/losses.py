"""Criteria built from `configs/criterion/*.yaml`.

Call convention (OML's): ``loss = criterion(embeddings[B, D], labels[B])`` -> scalar tensor; ``last_logs`` holds
extra per-batch floats (accuracy, triplet stats). Every class has an explicit signature, so a typo'd YAML key is a
``TypeError`` naming it, and the pipeline can inject ``num_classes`` / ``embedding_size`` / ``in_features`` /
``label2category`` by inspecting the signature.

- ``ArcFaceLoss``: OML's ArcFace with the same key names as the PML wrappers (margin, scale, label_smoothing).
- ``CosFaceLoss``, ``SphereFaceLoss``, ``SubCenterArcFaceLoss``: thin wrappers over PML, whose ``*args/**kwargs``
  signatures would otherwise lose ``num_classes``/``embedding_size``.
- ``SoftmaxLoss``: linear classifier + cross-entropy, optionally behind a BNNeck (re-ID bag of tricks).
- ``ClassificationTripletLoss``: weighted sum of a classification loss and a triplet loss (bag of tricks).
- ``ProxyAnchorLoss``: PML's, its proxies ``criterion.loss.proxies`` trained, checkpointed and DDP-synchronised.
- ``MultiSimilarityLoss``, ``CircleLoss``, ``SupConLoss``, ``NTXentLoss``: PML pair-based losses with an optional
  PML miner (``metriclab.models.xbm.PairLoss``, which the cross-batch memory there feeds with its rows).

All classification losses compute in float32 with autocast off: PML's ``cast_types`` would otherwise convert its
weight parameter to the embeddings' half dtype for good, and ArcFace's ``sqrt(1 - cos^2)`` turns NaN when a
half-precision cosine rounds above 1.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from oml.interfaces.criterions import ITripletLossWithMiner
from oml.interfaces.miners import ITripletsMinerInBatch
from oml.losses import ArcFaceLoss as OMLArcFaceLoss
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.miners import BaseMiner
from torch import Tensor, nn

from metriclab.core.config import build
from metriclab.models.xbm import PairLoss

TLabels = Union[Tensor, Sequence[int]]


def _labels_tensor(labels: TLabels, num_classes: int, device: torch.device) -> Tensor:
    """Labels as a long tensor on `device`, checked to be in 0..num_classes-1 (PML would fail with an index error)."""
    labels = torch.as_tensor(labels, device=device).long().view(-1)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"labels must be in 0..{num_classes - 1} (num_classes={num_classes} train labels), got min "
            f"{int(labels.min())}, max {int(labels.max())}: train labels must be remapped to 0..n-1 before the loss"
        )
    return labels


def _check_label_smoothing(label_smoothing: float) -> float:
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    return float(label_smoothing)


def _batch_accuracy(logits: Tensor, labels: Tensor) -> float:
    return float((logits.argmax(dim=1) == labels).float().mean())


class ArcFaceLoss(OMLArcFaceLoss):
    """OML's ArcFace (weight ``criterion.weight``, dropped by OML's checkpoint loader) with uniform key names.

    ``margin`` is the additive angular margin in radians (OML's ``m``), ``scale`` the logit scale (OML's ``s``),
    ``label_smoothing`` OML's ``smoothing_epsilon``. With ``label2category`` (a ``category`` column in the data) the
    smoothing mass is spread only over the labels of the sample's category (OML behaviour).
    """

    criterion_name = "arcface"

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        margin: float = 0.5,
        scale: float = 64.0,
        label_smoothing: float = 0.0,
        label2category: Optional[Dict[Any, Any]] = None,
    ):
        super().__init__(
            in_features=in_features,
            num_classes=num_classes,
            m=margin,
            s=scale,
            smoothing_epsilon=_check_label_smoothing(label_smoothing),
            label2category=label2category,
            reduction="mean",
        )

    def forward(self, x: Tensor, y: TLabels) -> Tensor:
        y = _labels_tensor(y, self.num_classes, x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return super().forward(x.float(), y)

    @property
    def last_logs(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self._last_logs.items()}


class _PMLClassificationLoss(nn.Module):
    """Holds a PML large-margin loss as ``self.loss`` (weights ``criterion.loss.W``, shape [D, C])."""

    criterion_name = "pml"

    def __init__(self, loss: nn.Module, num_classes: int, label_smoothing: float):
        super().__init__()
        self.loss: Any = loss  # a PML loss module: get_logits and cross_entropy are its own API
        self.num_classes = num_classes
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        if self.label_smoothing > 0:
            # PML applies `self.cross_entropy(logits, labels)` per sample, then its reducer averages.
            self.loss.cross_entropy = nn.CrossEntropyLoss(reduction="none", label_smoothing=self.label_smoothing)
        self._last_logs: Dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: TLabels) -> Tensor:
        labels = _labels_tensor(labels, self.num_classes, embeddings.device)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            loss = self.loss(embeddings, labels)
            with torch.no_grad():
                self._last_logs = {"accuracy": _batch_accuracy(self.loss.get_logits(embeddings.detach()), labels)}
        return loss

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


class CosFaceLoss(_PMLClassificationLoss):
    """CosFace (Wang et al. 2018) = PML ``CosFaceLoss``: logit_y = scale * (cos_y - margin)."""

    criterion_name = "cosface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 0.35,
        scale: float = 64.0,
        label_smoothing: float = 0.0,
    ):
        loss = pml_losses.CosFaceLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=margin, scale=scale
        )
        super().__init__(loss, num_classes, label_smoothing)


class SphereFaceLoss(_PMLClassificationLoss):
    """SphereFace (Liu et al. 2017) = PML ``SphereFaceLoss``: multiplicative angular margin (an integer),
    logits scaled by ``scale * ||embedding||`` (so with L2-normalised features use scale ~30-64, not 1)."""

    criterion_name = "sphereface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: int = 4,
        scale: float = 1.0,
        label_smoothing: float = 0.0,
    ):
        if int(margin) != margin or margin < 1:
            raise ValueError(f"SphereFace margin is an integer angle multiplier >= 1, got {margin}")
        loss = pml_losses.SphereFaceLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=int(margin), scale=scale
        )
        super().__init__(loss, num_classes, label_smoothing)


class SubCenterArcFaceLoss(_PMLClassificationLoss):
    """Sub-center ArcFace (Deng et al. 2020) = PML ``SubCenterArcFaceLoss``: ``sub_centers`` weight vectors per class,
    the closest one is used. ``margin`` is in DEGREES here (PML's unit; 28.6 deg = 0.5 rad, ArcFace's default)."""

    criterion_name = "subcenter_arcface"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        margin: float = 28.6,
        scale: float = 64.0,
        sub_centers: int = 3,
        label_smoothing: float = 0.0,
    ):
        loss = pml_losses.SubCenterArcFaceLoss(
            num_classes=num_classes,
            embedding_size=embedding_size,
            margin=margin,
            scale=scale,
            sub_centers=sub_centers,
        )
        super().__init__(loss, num_classes, label_smoothing)


class ProxyAnchorLoss(_PMLClassificationLoss):
    """Proxy-Anchor (Kim et al. 2020) = PML ``ProxyAnchorLoss``: one proxy per class (``criterion.loss.proxies``,
    [C, D]) pulls the batch's embeddings of its class and pushes the others (log-sum-exp, scale ``alpha``, cosine
    ``margin``). The proxies are parameters of the module: trained (the paper gives them a 100x rate:
    ``lr_criterion``), checkpointed, and kept equal across DDP processes like the extractor. ``last_logs``: the
    accuracy of the nearest proxy."""

    criterion_name = "proxy_anchor"

    def __init__(self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32.0):
        loss = pml_losses.ProxyAnchorLoss(
            num_classes=num_classes, embedding_size=embedding_size, margin=margin, alpha=alpha
        )
        super().__init__(loss, num_classes, label_smoothing=0.0)


class MultiSimilarityLoss(PairLoss):
    """Multi-Similarity (Wang et al. 2019) = PML ``MultiSimilarityLoss`` on cosine similarities; its YAML adds the
    paper's pair mining, PML's ``MultiSimilarityMiner``."""

    criterion_name = "multi_similarity"

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, miner: Optional[BaseMiner] = None):
        super().__init__(pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base), miner)


class CircleLoss(PairLoss):
    """Circle loss (Sun et al. 2020) = PML ``CircleLoss`` on cosine similarities (relaxation m, scale gamma)."""

    criterion_name = "circle"

    def __init__(self, m: float = 0.4, gamma: float = 80.0, miner: Optional[BaseMiner] = None):
        super().__init__(pml_losses.CircleLoss(m=m, gamma=gamma), miner)


class SupConLoss(PairLoss):
    """Supervised contrastive loss (Khosla et al. 2020) = PML ``SupConLoss``: per anchor, the mean over its positives
    of -log softmax over all its pairs, cosine / temperature."""

    criterion_name = "supcon"

    def __init__(self, temperature: float = 0.1, miner: Optional[BaseMiner] = None):
        super().__init__(pml_losses.SupConLoss(temperature=temperature), miner)


class NTXentLoss(PairLoss):
    """NT-Xent / InfoNCE (Chen et al. 2020, SimCLR) = PML ``NTXentLoss`` with class labels: each positive pair
    against the anchor's negatives, cosine / temperature."""

    criterion_name = "ntxent"

    def __init__(self, temperature: float = 0.07, miner: Optional[BaseMiner] = None):
        super().__init__(pml_losses.NTXentLoss(temperature=temperature), miner)


class SoftmaxLoss(nn.Module):
    """Linear classifier (no bias) + cross-entropy: the "ID loss" of the re-ID bag of tricks (Luo et al. 2019).

    With ``bnneck`` the embeddings pass a BatchNorm1d (bias frozen, as in the paper) before the classifier, so the
    triplet loss sees the raw features and the ID loss the normalised ones. Only the extractor's (pre-BN) features
    are used at inference, which the paper reports as slightly below post-BN ones.
    """

    criterion_name = "softmax"

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        label_smoothing: float = 0.0,
        bnneck: bool = True,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.bnneck: Optional[nn.BatchNorm1d] = None
        if bnneck:
            self.bnneck = nn.BatchNorm1d(embedding_size)
            self.bnneck.bias.requires_grad_(False)
        self.classifier = nn.Linear(embedding_size, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)  # the bag-of-tricks initialisation
        self.cross_entropy = nn.CrossEntropyLoss(label_smoothing=_check_label_smoothing(label_smoothing))
        self._last_logs: Dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: TLabels) -> Tensor:
        labels = _labels_tensor(labels, self.num_classes, embeddings.device)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            features = embeddings.float()
            if self.bnneck is not None:
                features = self.bnneck(features)
            logits = self.classifier(features)
            loss = self.cross_entropy(logits, labels)
        self._last_logs = {"accuracy": _batch_accuracy(logits.detach(), labels)}
        return loss

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


def build_part(node: Any, key: str, **runtime: Any) -> nn.Module:
    """One part of a composite criterion from its config node, by the one construction mechanism
    (`metriclab.core.config.build`): it gets the runtime values its target declares."""
    if not isinstance(node, (Mapping, DictConfig)) or "_target_" not in node:
        raise TypeError(f"`{key}` must be a config with a `_target_` (the YAML node), got {type(node).__name__}: "
                        f"num_classes and embedding_size are only known at build time")
    node = OmegaConf.create(dict(node) if not isinstance(node, DictConfig) else node)
    with open_dict(node):
        node.pop("_partial_", None)  # older configs marked the part `_partial_: true`: it meant this completion
    part = build(node, key, **runtime)
    if not isinstance(part, nn.Module):
        raise TypeError(f"`{key}._target_={node._target_}` built a {type(part).__name__}, not a loss module")
    return part


class ClassificationTripletLoss(nn.Module):
    """``classification_weight * classification(e, y) + triplet_weight * triplet(e, y)`` (re-ID bag of tricks).

    ``classification`` and ``triplet`` are their config nodes (the YAML sets ``_recursive_: false`` so Hydra passes
    them unbuilt), built here by ``metriclab.core.config.build``: the classification loss gets num_classes /
    embedding_size / in_features / label2category, the triplet criterion (e.g. TripletLossWithMiner + hard miner)
    whatever it declares of them (nothing). A built ``triplet`` module is accepted as it is.
    ``last_logs`` holds both parts' losses and their own logs, prefixed ``classification/`` and ``triplet/``.
    """

    criterion_name = "bot"

    def __init__(
        self,
        classification: Mapping[str, Any],
        triplet: Union[Mapping[str, Any], nn.Module],
        num_classes: int,
        embedding_size: int,
        classification_weight: float = 1.0,
        triplet_weight: float = 1.0,
        label2category: Optional[Dict[Any, Any]] = None,
    ):
        super().__init__()
        if classification_weight < 0 or triplet_weight < 0 or classification_weight + triplet_weight == 0:
            raise ValueError(
                f"weights must be >= 0 and not both 0, got classification_weight={classification_weight}, "
                f"triplet_weight={triplet_weight}"
            )
        runtime = {"num_classes": num_classes, "embedding_size": embedding_size, "in_features": embedding_size,
                   "label2category": label2category}
        self.classification = build_part(classification, "criterion.classification", **runtime)
        self.triplet = (triplet if isinstance(triplet, nn.Module)
                        else build_part(triplet, "criterion.triplet", **runtime))
        self.classification_weight = float(classification_weight)
        self.triplet_weight = float(triplet_weight)
        self._last_logs: Dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: TLabels) -> Tensor:
        labels = torch.as_tensor(labels, device=embeddings.device).long().view(-1)
        classification_loss = self.classification(embeddings, labels)
        triplet_loss = self.triplet(embeddings, labels)
        logs = {
            "classification_loss": float(classification_loss.detach()),
            "triplet_loss": float(triplet_loss.detach()),
        }
        for prefix, part in (("classification", self.classification), ("triplet", self.triplet)):
            for key, value in dict(getattr(part, "last_logs", {}) or {}).items():
                logs[f"{prefix}/{key}"] = float(value)
        self._last_logs = logs
        return self.classification_weight * classification_loss + self.triplet_weight * triplet_loss

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


def criterion_needs_balanced_batches(criterion: nn.Module) -> bool:
    """True when the criterion (or a part of it) mines triplets inside the batch: such a batch needs >= 2 labels
    with >= 2 images each (OML asserts it), i.e. `sampler=balance` or `sampler=category_balance`, not `~sampler`."""
    for module in [criterion, *criterion.modules()]:
        miner = getattr(module, "miner", None)
        if isinstance(module, ITripletLossWithMiner) and isinstance(miner, ITripletsMinerInBatch):
            return True
    return False


__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "ProxyAnchorLoss",
    "MultiSimilarityLoss",
    "CircleLoss",
    "SupConLoss",
    "NTXentLoss",
    "SoftmaxLoss",
    "ClassificationTripletLoss",
    "build_part",
    "criterion_needs_balanced_batches",
]
