"""Post-processing of a retrieval before its metrics are taken: a chain of steps from the `postprocess` config group.

    postprocess=k_reciprocal                 # k-reciprocal re-ranking (Zhong et al., CVPR 2017)
    postprocess=[dba,aqe]                    # database-side augmentation, then average query expansion
    postprocess=[dba,k_reciprocal] postprocess.k_reciprocal.k1=30

Steps run in the order the chain names them. `dba`, `aqe` and `alpha_qe` change the embeddings (cosine similarity,
unit-length results: `metriclab.evaluation.expansion`; a chain with one of them makes both sides unit length first,
so queries and gallery stay comparable); `k_reciprocal` replaces the query x gallery distances by
the re-ranked ones (`metriclab.evaluation.rerank`), so it must come last. The exclusions of the plain evaluation
(the same row, the same `sequence`) apply to the post-processed ranking too: the engine applies them to whatever
distances it ranks by. Bad values are a ConfigError naming the key (`postprocess.k_reciprocal.k1`, ...).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.schemas import (
    POSTPROCESS_STEPS,
    AlphaQEConfig,
    AverageQEConfig,
    DBAConfig,
    KReciprocalConfig,
)
from metriclab.evaluation.expansion import alpha_query_expansion, average_query_expansion, database_augmentation
from metriclab.evaluation.rerank import KReciprocal, check_k_reciprocal

PostprocessStep = Union[DBAConfig, AverageQEConfig, AlphaQEConfig, KReciprocalConfig]
#: step class -> its name in the config group
STEP_NAMES = {cls: name for name, cls in POSTPROCESS_STEPS.items()}


def step_name(step: PostprocessStep) -> str:
    return STEP_NAMES[type(step)]


def steps_from_config(node: Any) -> tuple[PostprocessStep, ...]:
    """The chain of the `postprocess` group (a mapping step name -> its keys, in chain order; None or empty = none).
    An unknown step or key, a bad value, or `k_reciprocal` before another step is a ConfigError naming it."""
    if node is None:
        return ()
    if not isinstance(node, (DictConfig, dict)):
        raise ConfigError(f"`postprocess` must name steps (postprocess=k_reciprocal or postprocess=[dba,aqe]), "
                          f"got {node!r}")
    steps = []
    for key, params in node.items():
        name = str(key)
        if name not in POSTPROCESS_STEPS:
            raise ConfigError(f"`postprocess.{name}` is not a post-processing step; use one of "
                              f"{list(POSTPROCESS_STEPS)} (or postprocess=none)")
        params = params if isinstance(params, DictConfig) else OmegaConf.create(params or {})
        steps.append(build(params, f"postprocess.{name}"))
    check_chain(tuple(steps))
    return tuple(steps)


def check_chain(steps: Sequence[Any]) -> None:
    """Every item a step; `k_reciprocal` (distances, not embeddings) only last."""
    for i, step in enumerate(steps):
        if type(step) not in STEP_NAMES:
            raise ConfigError(f"postprocess: {step!r} is not a post-processing step ({list(POSTPROCESS_STEPS)})")
        if isinstance(step, KReciprocalConfig) and i != len(steps) - 1:
            raise ConfigError(f"postprocess: k_reciprocal re-ranks distances, so it must be the last step; got the "
                              f"chain {[step_name(s) for s in steps]}")


def describe(steps: Sequence[PostprocessStep]) -> str:
    """`dba(k=5, alpha=0.0) -> k_reciprocal(k1=20, k2=6, lambda_value=0.3)`, or `none`."""
    if not steps:
        return "none"
    return " -> ".join(f"{step_name(s)}({', '.join(f'{k}={v}' for k, v in vars(s).items())})" for s in steps)


def _named(name: str, error: ValueError) -> ConfigError:
    return ConfigError(f"`postprocess.{name}`: {error}")


def apply_steps(steps: Sequence[PostprocessStep], q_emb: torch.Tensor, g_emb: torch.Tensor,
                squared_cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor, Optional[KReciprocal]]:
    """The chain applied to float32 embeddings: (queries, gallery, the re-ranker when the chain ends with
    `k_reciprocal`). A chain with an expansion step (dba, aqe, alpha_qe) makes both sides unit length first.
    `squared_cosine`: the evaluation ranks by cosine distance, so the re-ranking's squared Euclidean distances are
    taken between unit-length copies (2 - 2 cos)."""
    reranker = None
    if any(not isinstance(step, KReciprocalConfig) for step in steps):
        # the expansion steps work on cosine similarity and return unit rows: the other side must be unit too, or
        # the queries and the gallery would be compared on different scales
        q_emb, g_emb = (torch.nn.functional.normalize(x.float(), dim=1) for x in (q_emb, g_emb))
    for step in steps:
        name = step_name(step)
        try:
            if isinstance(step, DBAConfig):
                g_emb = database_augmentation(g_emb, step.k, step.alpha)
            elif isinstance(step, AverageQEConfig):
                q_emb = average_query_expansion(q_emb, g_emb, step.k)
            elif isinstance(step, AlphaQEConfig):
                q_emb = alpha_query_expansion(q_emb, g_emb, step.k, step.alpha)
            else:
                check_k_reciprocal(len(q_emb) + len(g_emb), step.k1, step.k2, step.lambda_value)
                q_in, g_in = (torch.nn.functional.normalize(x, dim=1) for x in (q_emb, g_emb)) \
                    if squared_cosine else (q_emb, g_emb)
                reranker = KReciprocal(q_in, g_in, step.k1, step.k2, step.lambda_value)
        except ValueError as e:
            raise _named(name, e) from e
    return q_emb, g_emb, reranker


def check_sizes(steps: Sequence[PostprocessStep], n_query: int, n_gallery: int) -> None:
    """The chain's k values against the number of queries and gallery items (checked before a job starts work):
    a ConfigError naming the key."""
    for step in steps:
        name = step_name(step)
        if isinstance(step, KReciprocalConfig):
            try:
                check_k_reciprocal(n_query + n_gallery, step.k1, step.k2, step.lambda_value)
            except ValueError as e:
                raise _named(name, e) from e
            continue
        if n_gallery < 2:
            raise ConfigError(f"`postprocess.{name}` needs a gallery of at least 2 items, got {n_gallery}")
        limit = n_gallery - 1 if isinstance(step, DBAConfig) else n_gallery
        if step.k > limit:
            raise ConfigError(f"`postprocess.{name}.k={step.k}` is larger than the {limit} gallery items it can use: "
                              f"lower it")


def ranked_topk(steps: Sequence[PostprocessStep], q_emb: torch.Tensor, g_emb: torch.Tensor, k: int,
                distance: str = "euclidean", block_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest gallery items of each query after the chain: (distances [Q, k] float32, ids [Q, k] int64),
    nearest first, equal distances in index order. The distances are the re-ranked ones after `k_reciprocal`, else
    `distance` (euclidean or cosine, in float64) between the post-processed embeddings. For a few queries at a time
    (predict): no exclusions, no labels."""
    q_emb, g_emb, reranker = apply_steps(steps, q_emb.float(), g_emb.float(), distance == "cosine")
    dists, ids = [], []
    g64 = g_emb.double()
    if distance == "cosine":
        g64 = torch.nn.functional.normalize(g64, dim=1)
    for lo in range(0, len(q_emb), block_rows):
        hi = min(lo + block_rows, len(q_emb))
        if reranker is not None:
            block = torch.from_numpy(reranker.block64(lo, hi))
        elif distance == "cosine":
            block = 1.0 - torch.nn.functional.normalize(q_emb[lo:hi].double(), dim=1) @ g64.T
        else:
            block = torch.cdist(q_emb[lo:hi].double(), g64)
        order = torch.sort(block, dim=1, stable=True).indices[:, :k]
        ids.append(order.numpy())
        dists.append(torch.gather(block, 1, order).float().numpy())
    return np.concatenate(dists), np.concatenate(ids).astype(np.int64)


#: float32 unit roundoff: a re-ranked distance (in [0, 1]) rounded to float32 is off by at most this
U32 = 2.0**-24


@dataclass
class RerankedKeys:
    """The engine's ranking keys when a re-ranker gives the distances (the same interface as
    `metriclab.evaluation.exact.RankingKeys`): a block's keys are its re-ranked distances rounded to float32, and
    where those are too close to tell apart (`tol`: twice the rounding bound of values in [0, 1]) the engine orders
    by the float64 values kept from the same block. Exactly equal values stay ties, ranked pessimistically."""

    reranker: KReciprocal
    n_q: int
    distance: str = "k_reciprocal"

    def __post_init__(self) -> None:
        self.tol = np.full(self.n_q, 4 * U32)
        self._lo, self._block = 0, np.zeros((0, 0))

    def block(self, lo: int, hi: int, out: torch.Tensor) -> torch.Tensor:
        self._lo, self._block = lo, self.reranker.block64(lo, hi)
        out.copy_(torch.from_numpy(self._block))
        return out

    def exact(self, q_rows: np.ndarray, g_cols: np.ndarray) -> np.ndarray:
        """float64 distances of the pairs (query q_rows[i], gallery g_cols[i]) of the block last computed."""
        return self._block[q_rows - self._lo, g_cols]

    def reported(self, exact: np.ndarray) -> np.ndarray:
        return exact.astype(np.float32)


__all__ = ["PostprocessStep", "RerankedKeys", "apply_steps", "check_chain", "check_sizes", "describe", "ranked_topk",
           "step_name", "steps_from_config"]
