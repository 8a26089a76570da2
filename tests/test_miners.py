"""Semi-hard miner: hand-built batches, a brute-force reference on raw L2 distances, the batch-hard fallback."""
import itertools

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from oml.losses import TripletLossWithMiner
from oml.miners import HardTripletsMiner

from metriclab.core.config import build
from metriclab.core.paths import CONFIGS_DIR
from metriclab.models.miners import SemiHardTripletsMiner


def _points(xs):
    """1-D positions as 2-D features (second coordinate 0)."""
    return torch.tensor([[float(x), 0.0] for x in xs])


def _triplets(miner, features, labels):
    ids = miner._sample(features, labels=labels)
    return set(zip(*ids))


def _brute_force_semihard(features, labels, margin):
    d = torch.cdist(features.double(), features.double()).numpy()
    found = set()
    for a, p, n in itertools.product(range(len(labels)), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[n] and d[a, p] < d[a, n] <= d[a, p] + margin:
            found.add((a, p, n))
    return found


def test_semihard_hand_built_batch():
    # labels 0 at x=0, 1; labels 1 at x=1.1, 3; margin 0.5.
    # a=0,p=1 (d=1): n=2 (d=1.1) semi-hard, n=3 (d=3) easy. a=1,p=0 (d=1): n=2 (0.1) hard, n=3 (2) easy.
    # a=2,p=3 (d=1.9): n=0 (1.1), n=1 (0.1) hard. a=3,p=2 (d=1.9): n=0 (3) easy, n=1 (2) semi-hard.
    features, labels = _points([0, 1, 1.1, 3]), [0, 0, 1, 1]
    miner = SemiHardTripletsMiner(margin=0.5)
    found = _triplets(miner, features, labels)
    assert found == {(0, 1, 2), (3, 2, 1)}
    d = torch.cdist(features, features)
    for a, p, n in found:
        assert d[a, p] < d[a, n] < d[a, p] + 0.5
    assert miner.last_logs == {"n_triplets": 2.0, "semihard_fallback": 0.0, "semihard_fallback_rate": 0.0}


def test_semihard_uses_raw_not_normalised_distances():
    # All points on one ray: L2-normalised they would all coincide (every distance 0, nothing semi-hard).
    features, labels = _points([1, 2, 2.3, 5]), [0, 0, 1, 1]
    found = _triplets(SemiHardTripletsMiner(margin=0.5), features, labels)
    assert found == _brute_force_semihard(features, labels, 0.5) == {(0, 1, 2), (3, 2, 1)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semihard_matches_brute_force_on_random_batches(seed):
    torch.manual_seed(seed)
    labels = [0] * 4 + [1] * 4 + [2] * 4
    features = torch.randn(12, 5)
    miner = SemiHardTripletsMiner(margin=1.0)
    found = _triplets(miner, features, labels)
    assert found == _brute_force_semihard(features, labels, 1.0)
    assert len(found) > 0 and miner.n_fallbacks == 0


def test_fallback_to_batch_hard_when_nothing_is_semihard():
    # Every triplet is hard or easy (see the distances): a=0,p=1 d=2 vs n=2 d=1 (hard), n=3 d=3 (easy, > 2 + 0.2) ...
    features, labels = _points([0, 2, 1, 3]), [0, 0, 1, 1]
    miner = SemiHardTripletsMiner(margin=0.2)
    assert _brute_force_semihard(features, labels, 0.2) == set()
    ids = miner._sample(features, labels=labels)
    hard = HardTripletsMiner()._sample(features, labels=labels)
    assert tuple(ids) == tuple(hard)
    assert miner.n_batches == 1 and miner.n_fallbacks == 1
    assert miner.last_logs == {"n_triplets": 4.0, "semihard_fallback": 1.0, "semihard_fallback_rate": 1.0}
    # Through OML's loss: every hard triplet has d(a,p)=2, d(a,n)=1 -> relu(0.2 + 2 - 1) = 1.2 (NaN without fallback)
    criterion = TripletLossWithMiner(margin=0.2, miner=miner, need_logs=True)
    loss = criterion(features, torch.tensor(labels))
    assert loss.item() == pytest.approx(1.2, rel=1e-6)
    assert criterion.last_logs["semihard_fallback"] == 1.0 and criterion.last_logs["n_triplets"] == 4.0
    assert loss.item() == pytest.approx(TripletLossWithMiner(margin=0.2, miner=HardTripletsMiner())(
        features, torch.tensor(labels)).item())
    # A batch with semi-hard triplets afterwards (2 of them at margin 0.2): 2 fallbacks in 3 batches
    assert len(miner._sample(_points([0, 1, 1.1, 3]), labels=[0, 0, 1, 1])[0]) == 2
    assert (miner.n_fallbacks, miner.n_batches) == (2, 3) and miner.fallback_rate == pytest.approx(2 / 3)
    assert miner.last_logs["semihard_fallback"] == 0.0


def test_well_separated_batch_falls_back_and_gives_zero_not_nan():
    features, labels = _points([0, 0.1, 10, 10.1]), torch.tensor([0, 0, 1, 1])
    loss = TripletLossWithMiner(margin=0.2, miner=SemiHardTripletsMiner(margin=0.2))(features, labels)
    assert loss.item() == 0.0  # hardest negative is 9.9 away: relu(0.2 + 0.1 - 9.9) = 0


def test_semihard_yaml_ties_the_mining_margin_to_the_loss_margin():
    cfg = OmegaConf.load(CONFIGS_DIR / "criterion" / "triplet_semihard.yaml")
    criterion = build(cfg, "criterion")
    assert isinstance(criterion.miner, SemiHardTripletsMiner)
    assert criterion.miner.margin == criterion.tri_loss.margin == 0.2
    cfg.merge_with_dotlist(["margin=0.35"])
    assert build(cfg, "criterion").miner.margin == 0.35
    features, labels = _points([0, 1, 1.1, 3]), torch.tensor([0, 0, 1, 1])
    loss = build(cfg, "criterion")(features, labels)
    # margin 0.35 mines (0,1,2) (1 < 1.1 <= 1.35) and (3,2,1) (1.9 < 2 <= 2.25): losses 0.25 and 0.25
    assert loss.item() == pytest.approx(0.25, rel=1e-5)


def test_semihard_needs_a_margin():
    with pytest.raises(ValueError, match="margin > 0"):
        SemiHardTripletsMiner(margin=None)
    with pytest.raises(ValueError, match="margin > 0"):
        SemiHardTripletsMiner(margin=0)


def test_semihard_on_half_precision_features():
    torch.manual_seed(0)
    labels = [0] * 3 + [1] * 3
    features = torch.randn(6, 4).half()
    ids = SemiHardTripletsMiner(margin=1.0)._sample(features, labels=labels)
    assert len(ids[0]) == len(ids[1]) == len(ids[2]) > 0
    assert all(isinstance(i, int) for i in ids[0])
    assert np.all([labels[a] == labels[p] != labels[n] for a, p, n in zip(*ids)])
