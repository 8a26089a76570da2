"""What the metric engine is asked: which metrics and how (`RetrievalSpec`), over which items (`RetrievalSide`).

A spec checks itself when it is made, so a bad k list or distance fails where it is written, not deep in a run.
The sides are checked by the engine, which needs both of them (lengths, dimensions, pairs given on one side only).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
from omegaconf import DictConfig, OmegaConf

from metriclab.core.config import build
from metriclab.core.constants import DISTANCES
from metriclab.core.schemas import BACKENDS, EvaluationConfig, KReciprocalConfig
from metriclab.evaluation.postprocess import check_chain

#: what the validation code accepts as the `evaluation` group: the built schema, or (while callers still pass the
#: raw node) a DictConfig or dict that `build` turns into it
EvaluationConfigLike = Union[EvaluationConfig, DictConfig, dict]


def as_evaluation_config(cfg: Optional[EvaluationConfigLike]) -> EvaluationConfig:
    """`cfg` as an `EvaluationConfig`; a DictConfig or dict is built (an unknown key is a ConfigError naming it)."""
    if isinstance(cfg, EvaluationConfig):
        return cfg
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg if cfg is not None else {})
    return build(node, "evaluation")


def _check_ks(ks: Any, name: str) -> tuple[int, ...]:
    if ks is None:
        return ()
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(ks)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"{name} must contain positive integers, got {ks}")
    return tuple(int(k) for k in ks)


def _check_pcf_variance(values: Any) -> tuple[float, ...]:
    if values is None:
        return ()
    if isinstance(values, (int, float)):
        values = (values,)
    values = tuple(float(v) for v in values)
    if not all(0.0 <= v <= 1.0 for v in values):
        raise ValueError(f"pcf_variance must contain fractions in [0, 1], got {values}")
    return values


def _is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


@dataclass(frozen=True)
class RetrievalSpec:
    """Which metrics `evaluate_retrieval` computes and how (the engine's docstring defines each metric).

    ``*_top_k``: the k of each metric (an int or any sequence; stored as a tuple). ``pcf_variance``: fractions in
    [0, 1]. ``distance``: ``"euclidean"`` or ``"cosine"`` (1 - cosine similarity). ``backend``: ``"exact"``,
    ``"faiss-flat"`` (exact search, top-k metrics only) or ``"faiss-hnsw"`` (approximate, top-k metrics only;
    ``hnsw_m``, ``hnsw_ef_construction``, ``hnsw_ef_search`` are its parameters). ``keep_top_k``: length of the
    nearest-gallery lists in the report. ``block_size``: queries per block (None: a block's float32 distances stay
    within ~64 MB), so memory stays bounded as the gallery grows. ``postprocess``: the chain of post-processing
    steps (`metriclab.evaluation.postprocess`; empty = the plain ranking).
    """

    cmc_top_k: tuple[int, ...] = (1, 5, 10)
    map_top_k: tuple[int, ...] = (5,)
    precision_top_k: tuple[int, ...] = (5,)
    knn_top_k: tuple[int, ...] = (1,)
    pcf_variance: tuple[float, ...] = (0.5,)
    distance: str = "euclidean"
    backend: str = "exact"
    keep_top_k: int = 10
    block_size: Optional[int] = None
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 256
    postprocess: tuple = ()

    def __post_init__(self) -> None:
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        # frozen: the normalised values are set through object.__setattr__, once, here
        for name in ("cmc_top_k", "map_top_k", "precision_top_k", "knn_top_k"):
            object.__setattr__(self, name, _check_ks(getattr(self, name), name))
        object.__setattr__(self, "pcf_variance", _check_pcf_variance(self.pcf_variance))
        if not _is_int(self.keep_top_k) or self.keep_top_k < 0:
            raise ValueError(f"keep_top_k must be a non-negative integer, got {self.keep_top_k!r}")
        object.__setattr__(self, "keep_top_k", int(self.keep_top_k))
        if self.block_size is not None:
            if not _is_int(self.block_size) or self.block_size < 1:
                raise ValueError(f"block_size must be a positive integer or None, got {self.block_size!r}")
            object.__setattr__(self, "block_size", int(self.block_size))
        for name in ("hnsw_m", "hnsw_ef_construction", "hnsw_ef_search"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        object.__setattr__(self, "postprocess", tuple(self.postprocess))
        check_chain(self.postprocess)
        if any(isinstance(s, KReciprocalConfig) for s in self.postprocess) and not self.exact:
            raise ValueError(f"postprocess k_reciprocal re-ranks the whole gallery: it needs backend='exact', got "
                             f"{self.backend!r}")

    @property
    def exact(self) -> bool:
        """Only the exact backend ranks the whole gallery, so only it gives mAP / mINP (and per-query AP)."""
        return self.backend == "exact"

    @property
    def search_depth(self) -> int:
        """How deep a top-k backend must search: the longest list any metric or the report reads."""
        return max([self.keep_top_k, *self.cmc_top_k, *self.map_top_k, *self.precision_top_k, *self.knn_top_k, 1])

    @classmethod
    def from_config(cls, cfg: EvaluationConfigLike, **overrides: Any) -> "RetrievalSpec":
        """The spec of the `evaluation` config group: the report keeps `grid_top_k` neighbours (what the worst-query
        grid shows). `overrides`: fields the group does not hold (block size, HNSW parameters)."""
        cfg = as_evaluation_config(cfg)
        values: dict[str, Any] = dict(
            cmc_top_k=tuple(cfg.cmc_top_k), map_top_k=tuple(cfg.map_top_k),
            precision_top_k=tuple(cfg.precision_top_k), knn_top_k=tuple(cfg.knn_top_k),
            pcf_variance=tuple(cfg.pcf_variance), distance=cfg.distance, backend=cfg.backend,
            keep_top_k=int(cfg.grid_top_k),
        )
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True, eq=False)
class RetrievalSide:
    """The items of one side (the queries or the gallery), in any array-like form (torch, numpy, pandas, lists).

    ``embeddings``: ``[n_items, dim]`` real numbers. ``labels``: one integer per item. ``ids`` (optional, both
    sides or neither): a query and a gallery item with the same id are the same dataset row, never compared.
    ``sequences`` (optional, both sides or neither): pairs in the same sequence are excluded (Market:
    ``"<pid>_c<cam>"``); a missing value (None/NaN) belongs to no sequence. ``categories`` (queries only): metrics
    are also reported per category, as ``"<category>/<metric>"``.
    """

    embeddings: Any
    labels: Any
    ids: Any = None
    sequences: Any = None
    categories: Any = None


__all__ = ["EvaluationConfigLike", "RetrievalSide", "RetrievalSpec", "as_evaluation_config"]
