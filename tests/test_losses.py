"""Criteria: PML wrappers equal PML's own losses, hand-computed margins and label smoothing, every criterion YAML
builds through the pipeline's `build` and trains on a BalanceSampler batch."""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from oml.losses import ArcFaceLoss as OMLArcFaceLoss
from oml.losses import TripletLossWithMiner
from oml.miners import HardTripletsMiner
from pytorch_metric_learning import losses as pml_losses

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.data.samplers import BalanceSampler
from metriclab.models.losses import (
    ArcFaceLoss,
    ClassificationTripletLoss,
    CosFaceLoss,
    SoftmaxLoss,
    SphereFaceLoss,
    SubCenterArcFaceLoss,
    criterion_needs_balanced_batches,
)

CRITERIA = ["triplet_all", "triplet_hard", "triplet_semihard", "arcface", "cosface", "sphereface",
            "subcenter_arcface", "bot"]
CLASSIFICATION = ["arcface", "cosface", "sphereface", "subcenter_arcface"]


def _runtime(num_classes=6, embedding_size=8, label2category=None):
    return dict(num_classes=num_classes, embedding_size=embedding_size, in_features=embedding_size,
                label2category=label2category)


def _build_criterion(name, overrides=(), **runtime):
    cfg = OmegaConf.load(CONFIGS_DIR / "criterion" / f"{name}.yaml")
    for deletion in [o[1:] for o in overrides if o.startswith("~")]:  # Hydra's `~key` override
        parent, _, key = deletion.rpartition(".")
        del (OmegaConf.select(cfg, parent) if parent else cfg)[key]
    cfg.merge_with_dotlist([o for o in overrides if not o.startswith("~")])
    return build(cfg, "criterion", **(runtime or _runtime()))


def _np_ce(logits, target, eps=0.0):
    """Cross-entropy with label smoothing, by hand: (1 - eps) * CE + eps * mean over classes of -log p."""
    logits = np.asarray(logits, dtype=np.float64)
    logp = logits - logits.max(axis=1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(axis=1, keepdims=True))
    rows = np.arange(len(target))
    return float(np.mean((1 - eps) * -logp[rows, target] + eps * -logp.mean(axis=1)))


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# Hand case: 3 classes in 2-D, 3 embeddings near their class directions.
W_HAND = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 1.0]])            # [C, D]
E_HAND = np.array([[2.0, 0.3], [0.2, 1.5], [-1.0, 0.6]])            # [B, D]
Y_HAND = np.array([0, 1, 2])
COS_HAND = _unit(E_HAND) @ _unit(W_HAND).T                         # [B, C]


def _cosface_logits(scale, margin):
    logits = COS_HAND.copy()
    logits[np.arange(3), Y_HAND] -= margin
    return scale * logits


def _arcface_logits(scale, margin_rad, cos=COS_HAND):
    logits = cos.copy()
    theta = np.arccos(cos[np.arange(3), Y_HAND])
    assert np.all(theta + margin_rad < np.pi)  # the regular branch of both implementations
    logits[np.arange(3), Y_HAND] = np.cos(theta + margin_rad)
    return scale * logits


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cosface_matches_hand_formula_and_label_smoothing(eps):
    loss = CosFaceLoss(num_classes=3, embedding_size=2, margin=0.35, scale=10.0, label_smoothing=eps)
    with torch.no_grad():
        loss.loss.W.copy_(torch.tensor(W_HAND.T, dtype=torch.float32))
    value = loss(torch.tensor(E_HAND, dtype=torch.float32), torch.tensor(Y_HAND))
    expected = _np_ce(_cosface_logits(10.0, 0.35), Y_HAND, eps)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    if eps:  # smoothing moves the loss by eps * (mean_k -log p_k - CE) on these logits
        plain = _np_ce(_cosface_logits(10.0, 0.35), Y_HAND, 0.0)
        assert value.item() - plain == pytest.approx(expected - plain, rel=1e-4)
        assert value.item() - plain > 0.1  # confident logits: smoothing costs a visible amount


@pytest.mark.parametrize("wrapper, pml_cls, kwargs", [
    (CosFaceLoss, pml_losses.CosFaceLoss, dict(margin=0.2, scale=32.0)),
    (SphereFaceLoss, pml_losses.SphereFaceLoss, dict(margin=3, scale=1.5)),
    (SubCenterArcFaceLoss, pml_losses.SubCenterArcFaceLoss, dict(margin=20.0, scale=16.0, sub_centers=2)),
])
def test_pml_wrappers_equal_pml_losses_on_the_same_weights(wrapper, pml_cls, kwargs):
    torch.manual_seed(0)
    ours = wrapper(num_classes=5, embedding_size=6, **kwargs)
    theirs = pml_cls(num_classes=5, embedding_size=6, **kwargs)
    theirs.W.data.copy_(ours.loss.W.data)
    emb, labels = torch.randn(12, 6), torch.randint(0, 5, (12,))
    assert ours(emb, labels).item() == pytest.approx(theirs(emb, labels).item(), rel=1e-6)
    assert 0.0 <= ours.last_logs["accuracy"] <= 1.0


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_subcenter_arcface_hand_case(eps):
    """Sub-centers: each class's cosine is the max over its 2 centers, then the ArcFace margin (degrees)."""
    second = np.array([[0.6, -0.8], [-0.9, 0.1], [0.0, -1.0]])      # a second center per class
    centers = np.stack([W_HAND, second], axis=1)                     # [C, K, D]
    loss = SubCenterArcFaceLoss(num_classes=3, embedding_size=2, margin=28.6, scale=8.0, sub_centers=2,
                                label_smoothing=eps)
    with torch.no_grad():  # PML lays out W as [D, C * K], class-major
        loss.loss.W.copy_(torch.tensor(centers.reshape(6, 2).T, dtype=torch.float32))
    cos = (_unit(E_HAND)[:, None, None, :] * _unit(centers)[None]).sum(-1).max(axis=2)
    expected = _np_ce(_arcface_logits(8.0, np.radians(28.6), cos), Y_HAND, eps)
    value = loss(torch.tensor(E_HAND, dtype=torch.float32), torch.tensor(Y_HAND)).item()
    assert value == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_arcface_equals_oml_and_hand_formula(eps):
    ours = ArcFaceLoss(in_features=2, num_classes=3, margin=0.5, scale=10.0, label_smoothing=eps)
    theirs = OMLArcFaceLoss(in_features=2, num_classes=3, m=0.5, s=10.0, smoothing_epsilon=eps)
    with torch.no_grad():
        ours.weight.copy_(torch.tensor(W_HAND, dtype=torch.float32))
        theirs.weight.copy_(ours.weight)
    emb, y = torch.tensor(E_HAND, dtype=torch.float32), torch.tensor(Y_HAND)
    value = ours(emb, y).item()
    assert value == pytest.approx(theirs(emb, y).item(), rel=1e-6)
    assert value == pytest.approx(_np_ce(_arcface_logits(10.0, 0.5), Y_HAND, eps), rel=1e-5)
    assert ours.last_logs == {"accuracy": 1.0} and isinstance(ours.last_logs["accuracy"], float)


def test_arcface_category_label_smoothing_stays_inside_the_category():
    """Classes 0, 1 in category "a", class 2 in "b": smoothing mass eps/2 goes to classes 0 and 1 only (rows 0, 1),
    and all of it to class 2 for row 2."""
    eps = 0.2
    loss = ArcFaceLoss(in_features=2, num_classes=3, margin=0.5, scale=10.0, label_smoothing=eps,
                       label2category={0: "a", 1: "a", 2: "b"})
    with torch.no_grad():
        loss.weight.copy_(torch.tensor(W_HAND, dtype=torch.float32))
    logits = _arcface_logits(10.0, 0.5)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    targets = np.array([[1 - eps + eps / 2, eps / 2, 0], [eps / 2, 1 - eps + eps / 2, 0], [0, 0, 1.0]])
    expected = float(np.mean(-(targets * logp).sum(axis=1)))
    value = loss(torch.tensor(E_HAND, dtype=torch.float32), torch.tensor(Y_HAND)).item()
    assert value == pytest.approx(expected, rel=1e-5)
    assert value != pytest.approx(_np_ce(logits, Y_HAND, eps), rel=1e-3)


def test_softmax_loss_hand_case_and_bnneck():
    loss = SoftmaxLoss(num_classes=3, embedding_size=2, label_smoothing=0.1, bnneck=False)
    with torch.no_grad():
        loss.classifier.weight.copy_(torch.tensor(W_HAND, dtype=torch.float32))
    value = loss(torch.tensor(E_HAND, dtype=torch.float32), torch.tensor(Y_HAND)).item()
    assert value == pytest.approx(_np_ce(E_HAND @ W_HAND.T, Y_HAND, 0.1), rel=1e-5)
    with_neck = SoftmaxLoss(num_classes=3, embedding_size=2, bnneck=True)
    assert not with_neck.bnneck.bias.requires_grad and with_neck.bnneck.weight.requires_grad
    assert tuple(with_neck.classifier.weight.shape) == (3, 2) and with_neck.classifier.bias is None


def test_loss_weights_stay_fp32_under_autocast():
    """PML's cast_types would turn W into bf16 for good; the wrapper computes in fp32 instead."""
    torch.manual_seed(0)
    loss = CosFaceLoss(num_classes=4, embedding_size=8)
    arc = ArcFaceLoss(in_features=8, num_classes=4)
    emb, y = torch.randn(6, 8).bfloat16(), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, arc_value = loss(emb, y), arc(emb, y)
    assert loss.loss.W.dtype == torch.float32 and value.dtype == torch.float32
    assert value.item() == loss(emb.float(), y).item()
    assert torch.isfinite(arc_value) and arc_value.item() == arc(emb.float(), y).item()


def test_labels_out_of_range_are_a_clear_error():
    loss = CosFaceLoss(num_classes=3, embedding_size=2)
    with pytest.raises(ValueError, match=r"labels must be in 0\.\.2 .*max 7"):
        loss(torch.randn(2, 2), torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="label_smoothing"):
        CosFaceLoss(num_classes=3, embedding_size=2, label_smoothing=1.0)


@pytest.mark.parametrize("name, bad_key", [("cosface", "marginn"), ("subcenter_arcface", "subcenters"),
                                           ("arcface", "m"), ("bot", "triplet_weigth")])
def test_unknown_yaml_key_is_an_error_naming_it(name, bad_key):
    with pytest.raises(ConfigError, match=f"unexpected keyword argument '{bad_key}'"):
        _build_criterion(name, [f"{bad_key}=1"])


def _balance_batch(seed=0):
    labels = [i // 5 for i in range(30)]  # 6 labels x 5 images
    np.random.seed(seed)
    batch = next(iter(BalanceSampler(labels, n_labels=3, n_instances=4)))
    return torch.tensor([labels[i] for i in batch])


@pytest.mark.parametrize("name", CRITERIA)
def test_every_criterion_yaml_trains_on_a_balance_sampler_batch(name):
    torch.manual_seed(0)
    criterion = _build_criterion(name)
    labels = _balance_batch()
    assert len(labels) == 12 and len(set(labels.tolist())) == 3
    embeddings = torch.randn(12, 8, requires_grad=True)
    loss = criterion(embeddings, labels)
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    params = [p for p in criterion.parameters() if p.requires_grad]
    if name.startswith("triplet"):
        assert params == []
    else:  # class weights get gradients, so the optimizer trains them and the checkpoint holds them
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        assert any(k.endswith(("weight", "W")) for k in criterion.state_dict())
    logs = criterion.last_logs
    assert logs and all(isinstance(v, float) and math.isfinite(v) for v in logs.values())
    assert criterion_needs_balanced_batches(criterion) == (name.startswith("triplet") or name == "bot")


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_classification_criteria_work_without_balanced_batches(name):
    torch.manual_seed(0)
    criterion = _build_criterion(name)
    labels = torch.tensor([0, 1, 2, 3, 4, 5])  # every label once: triplet mining would assert here
    assert torch.isfinite(criterion(torch.randn(6, 8), labels))
    with pytest.raises(AssertionError):  # OML's in-batch miners need >= 2 images per label
        _build_criterion("triplet_hard")(torch.randn(6, 8), labels)


def test_runtime_sizes_reach_the_weights():
    sizes = {"arcface": (5, 7), "cosface": (7, 5), "sphereface": (7, 5), "subcenter_arcface": (7, 15)}
    for name, shape in sizes.items():
        criterion = _build_criterion(name, **_runtime(num_classes=5, embedding_size=7))
        weight = criterion.weight if name == "arcface" else criterion.loss.W
        assert tuple(weight.shape) == shape, name


def test_bot_is_the_weighted_sum_of_its_parts():
    torch.manual_seed(0)
    criterion = _build_criterion("bot", ["classification_weight=0.5", "triplet_weight=2.0"])
    assert isinstance(criterion, ClassificationTripletLoss)
    assert isinstance(criterion.classification, SoftmaxLoss) and criterion.classification.bnneck is not None
    assert tuple(criterion.classification.classifier.weight.shape) == (6, 8)
    assert isinstance(criterion.triplet, TripletLossWithMiner) and criterion.triplet.tri_loss.margin == 0.3
    assert isinstance(criterion.triplet.miner, HardTripletsMiner)
    assert criterion.classification.cross_entropy.label_smoothing == 0.1
    labels, embeddings = _balance_batch(), torch.randn(12, 8)
    total = criterion(embeddings, labels).item()
    cls, tri = criterion.last_logs["classification_loss"], criterion.last_logs["triplet_loss"]
    assert total == pytest.approx(0.5 * cls + 2.0 * tri, rel=1e-6)
    assert tri == pytest.approx(criterion.triplet(embeddings, labels).item(), rel=1e-6)
    assert "classification/accuracy" in criterion.last_logs and "triplet/active_tri" in criterion.last_logs


def test_bot_with_arcface_gets_in_features_and_categories():
    criterion = _build_criterion(
        "bot", ["classification._target_=metriclab.models.losses.ArcFaceLoss", "~classification.bnneck"],
        **_runtime(num_classes=6, embedding_size=8, label2category={i: i % 2 for i in range(6)}))
    assert isinstance(criterion.classification, ArcFaceLoss)
    assert tuple(criterion.classification.weight.shape) == (6, 8)
    assert criterion.classification.label2category.tolist() == [0, 1, 0, 1, 0, 1]
    assert torch.isfinite(criterion(torch.randn(12, 8), _balance_batch()))


def test_bot_needs_the_classification_config():
    with pytest.raises(TypeError, match="must be a config with a `_target_`"):
        ClassificationTripletLoss(classification=SoftmaxLoss(3, 2), triplet=TripletLossWithMiner(0.2),
                                  num_classes=3, embedding_size=2)
    with pytest.raises(ValueError, match="not both 0"):
        ClassificationTripletLoss(classification={"_target_": "metriclab.models.losses.SoftmaxLoss"},
                                  triplet=TripletLossWithMiner(0.2), num_classes=3, embedding_size=2,
                                  classification_weight=0, triplet_weight=0)


def test_bot_builds_its_classification_part_with_the_runtime_sizes():
    """The part is built by `build` (one mechanism): the sizes reach it; an old `_partial_: true` means the same."""
    for node in ({"_target_": "metriclab.models.losses.SoftmaxLoss", "label_smoothing": 0.2},
                 {"_target_": "metriclab.models.losses.SoftmaxLoss", "_partial_": True, "label_smoothing": 0.2}):
        loss = ClassificationTripletLoss(classification=node, triplet=TripletLossWithMiner(0.2), num_classes=5,
                                         embedding_size=3)
        assert isinstance(loss.classification, SoftmaxLoss)
        assert tuple(loss.classification.classifier.weight.shape) == (5, 3)
        assert loss.classification.cross_entropy.label_smoothing == 0.2
    with pytest.raises(ConfigError, match="criterion.classification"):
        ClassificationTripletLoss(classification={"_target_": "metriclab.models.losses.SoftmaxLoss", "smoothing": 0.1},
                                  triplet=TripletLossWithMiner(0.2), num_classes=5, embedding_size=3)
