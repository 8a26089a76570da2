"""Semi-hard triplet mining for OML's ``TripletLossWithMiner`` (OML has all/hard miners but no semi-hard one).

PML's ``TripletMarginMiner(type_of_triplets="semihard")`` does the mining; this adapter gives it OML's
``ITripletsMinerInBatch`` interface, un-normalised Euclidean distances (OML's ``TripletLoss`` uses raw L2, PML's
default distance L2-normalises first) and a fallback to batch-hard triplets when a batch has no semi-hard triplet:
an empty triplet set makes the mean loss NaN.
"""
from __future__ import annotations

import logging
from typing import Dict, List

import torch
from oml.interfaces.miners import ITripletsMinerInBatch, TTripletsIds
from oml.utils.misc_torch import pairwise_dist
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.miners import TripletMarginMiner
from torch import Tensor

from metriclab.core.compat import oml_hard_triplets

log = logging.getLogger(__name__)


class SemiHardTripletsMiner(ITripletsMinerInBatch):
    """All triplets (a, p, n) of the batch with ``d(a,p) < d(a,n) <= d(a,p) + margin`` (PML's semi-hard rule on raw
    L2 distances). Use the triplet loss's margin: these are exactly the triplets with a positive loss that are not
    "hard" (negative closer than the positive).

    When a batch has none, the batch-hard triplets (hardest positive and negative per anchor, OML's
    ``HardTripletsMiner``) are returned instead. ``n_batches`` / ``n_fallbacks`` count calls and fallbacks since
    construction; ``last_logs`` has ``n_triplets``, ``semihard_fallback`` (1.0 if this batch fell back) and
    ``semihard_fallback_rate`` (running ratio), which ``TripletLossWithMiner`` copies into its own ``last_logs``.
    """

    def __init__(self, margin: float = 0.2):
        if margin is None or margin <= 0:
            raise ValueError(f"semi-hard mining needs a margin > 0 (the triplet loss's margin), got {margin}")
        self.margin = float(margin)
        self._pml_miner = TripletMarginMiner(
            margin=self.margin,
            type_of_triplets="semihard",
            distance=LpDistance(normalize_embeddings=False, p=2, power=1),
        )
        self.n_batches = 0
        self.n_fallbacks = 0
        self._last_logs: Dict[str, float] = {}

    def _sample(self, features: Tensor, labels: List[int]) -> TTripletsIds:
        assert features.shape[0] == len(labels)
        # fp32: PML's LpDistance has a slow element-wise path for fp16.
        features = features.detach().float()
        labels_tensor = torch.tensor(labels, device=features.device)
        ids_a, ids_p, ids_n = self._pml_miner(features, labels_tensor)
        self.n_batches += 1
        used_fallback = len(ids_a) == 0
        if used_fallback:
            self.n_fallbacks += 1
            log.debug("no semi-hard triplet in a batch of %d, falling back to batch-hard triplets", len(labels))
            distmat = pairwise_dist(x1=features, x2=features, p=2)
            ids_a, ids_p, ids_n = oml_hard_triplets(distmat, labels)
        else:
            ids_a, ids_p, ids_n = ids_a.tolist(), ids_p.tolist(), ids_n.tolist()
        self._last_logs = {
            "n_triplets": float(len(ids_a)),
            "semihard_fallback": float(used_fallback),
            "semihard_fallback_rate": self.fallback_rate,  # n_batches >= 1 here
        }
        return list(ids_a), list(ids_p), list(ids_n)

    @property
    def fallback_rate(self) -> float:
        return self.n_fallbacks / self.n_batches if self.n_batches else 0.0

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


__all__ = ["SemiHardTripletsMiner"]
