"""Schemas of the config groups that are read as plain values (no `_target_`).

Each is a dataclass: `core.config.build(node, key)` merges the node into it, so an unknown or misspelt key, or a
value of the wrong type, is an error naming the key; the result is a typed object, not a DictConfig read by key.
Groups with a `_target_` have their target's signature as schema (also checked by `build`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from omegaconf import MISSING

from metriclab.core.constants import DISTANCES
from metriclab.core.errors import ConfigError

#: evaluation.backend: exact metrics, or faiss top-k search (top-k metrics only)
BACKENDS = ("exact", "faiss-flat", "faiss-hnsw")
#: dataset.on_bad_image: an image that cannot be read stops the job, or a blank image stands in for it
ON_BAD_IMAGE = ("error", "skip")
#: index.kind (predict): exact or approximate faiss search
INDEX_KINDS = ("flat", "hnsw")


def check_choice(key: str, value: str, choices: tuple) -> None:
    if value not in choices:
        raise ConfigError(f"`{key}={value}` is not supported; choose one of {list(choices)}")


@dataclass
class EvaluationConfig:
    """`evaluation`: what validation computes and draws (configs/evaluation/default.yaml comments each key)."""

    cmc_top_k: List[int] = field(default_factory=lambda: [1, 5, 10])
    map_top_k: List[int] = field(default_factory=lambda: [5])
    precision_top_k: List[int] = field(default_factory=lambda: [5])
    knn_top_k: List[int] = field(default_factory=lambda: [1])
    pcf_variance: List[float] = field(default_factory=lambda: [0.5])
    distance: str = "euclidean"
    backend: str = "exact"
    worst_queries: int = 5
    grid_top_k: int = 5
    grid_missed: int = 2
    tsne: bool = False
    tsne_max_points: int = 2000
    flip_tta: bool = False
    verification: bool = True
    fmr_vals: List[float] = field(default_factory=lambda: [0.1, 0.01, 0.001])

    def __post_init__(self) -> None:
        check_choice("evaluation.distance", self.distance, DISTANCES)
        check_choice("evaluation.backend", self.backend, BACKENDS)
        for x in self.fmr_vals:
            if not 0.0 < float(x) < 1.0:
                raise ConfigError(f"`evaluation.fmr_vals` holds {x}: false match rates are fractions in (0, 1), "
                                  f"e.g. [0.1, 0.01, 0.001]")


@dataclass
class CalibrationConfig:
    """`calibration`: the operating point whose distance threshold the checkpoint (and an export's model.json)
    records: `threshold@fmr_<target_fmr>` of the validation pass (accept a pair when its distance <= it)."""

    target_fmr: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 < float(self.target_fmr) < 1.0:
            raise ConfigError(f"`calibration.target_fmr={self.target_fmr}`: a false match rate is a fraction in "
                              f"(0, 1), e.g. 0.01")


@dataclass
class DatasetConfig:
    """`dataset`: a dataset in OML's CSV format."""

    root: str = MISSING
    csv: str = "dataset.csv"
    cache_size: int = 0
    allow_outside_root: bool = False
    on_bad_image: str = "error"

    def __post_init__(self) -> None:
        check_choice("dataset.on_bad_image", self.on_bad_image, ON_BAD_IMAGE)


@dataclass
class IndexConfig:
    """`index` (predict): the faiss index over the gallery; the HNSW keys mean nothing to `flat`."""

    kind: str = "flat"
    m: int = 32
    ef_construction: int = 200
    ef_search: int = 128

    def __post_init__(self) -> None:
        check_choice("index.kind", self.kind, INDEX_KINDS)


@dataclass
class PathsConfig:
    """`paths`: every location a job writes to, absolute."""

    repo_root: str = MISSING
    outputs_dir: str = MISSING
    run_dir: str = MISSING
    mlflow_uri: str = MISSING
    mlartifacts: str = MISSING


def check_positive(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"`{key}={value}` must be a positive integer")


def check_unit_interval(key: str, value: float) -> None:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"`{key}={value}` must lie in [0, 1]")


@dataclass
class KReciprocalConfig:
    """`postprocess.k_reciprocal`: k-reciprocal re-ranking (Zhong et al., CVPR 2017), fast-reid's defaults."""

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        check_positive("postprocess.k_reciprocal.k1", self.k1)
        check_positive("postprocess.k_reciprocal.k2", self.k2)
        check_unit_interval("postprocess.k_reciprocal.lambda_value", self.lambda_value)


@dataclass
class AverageQEConfig:
    """`postprocess.aqe`: average query expansion over the top `k` gallery items (Chum et al., 2007)."""

    k: int = 5

    def __post_init__(self) -> None:
        check_positive("postprocess.aqe.k", self.k)


@dataclass
class AlphaQEConfig:
    """`postprocess.alpha_qe`: alpha-weighted query expansion (Radenovic et al., 2018), fast-reid's k and alpha."""

    k: int = 5
    alpha: float = 3.0

    def __post_init__(self) -> None:
        check_positive("postprocess.alpha_qe.k", self.k)
        if self.alpha < 0:
            raise ConfigError(f"`postprocess.alpha_qe.alpha={self.alpha}` must be >= 0")


@dataclass
class DBAConfig:
    """`postprocess.dba`: database-side augmentation over each gallery item's top `k` gallery neighbours."""

    k: int = 5
    alpha: float = 0.0

    def __post_init__(self) -> None:
        check_positive("postprocess.dba.k", self.k)
        if self.alpha < 0:
            raise ConfigError(f"`postprocess.dba.alpha={self.alpha}` must be >= 0")


@dataclass
class DebugConfig:
    """`debug` (set by `debug=<name>`, configs/debug/): marks a run as a debug run (metriclab.tracking.debug)."""

    name: str = MISSING
    experiment_suffix: str = "-debug"

    def __post_init__(self) -> None:
        if not str(self.name).strip():
            raise ConfigError("`debug.name` is empty: name the debug mode (configs/debug/<name>.yaml sets it)")
        if not str(self.experiment_suffix).strip():
            raise ConfigError("`debug.experiment_suffix` is empty: debug runs must not go to the experiment of real "
                              "results")


@dataclass
class ParityConfig:
    """`parity` (export): ONNX vs PyTorch embeddings on real validation images, at batch 1 and `batch_size`. Only the
    export config has the group."""

    batch_size: int = 8
    atol: float = 1e-4
    min_cosine: float = 0.9999

    def __post_init__(self) -> None:
        check_positive("parity.batch_size", self.batch_size)
        if not self.atol >= 0:
            raise ConfigError(f"`parity.atol={self.atol}` must be >= 0")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ConfigError(f"`parity.min_cosine={self.min_cosine}` must lie in [-1, 1]")


#: the post-processing steps (`postprocess.<name>`), in the order a chain may use them
POSTPROCESS_STEPS = {
    "dba": DBAConfig,
    "aqe": AverageQEConfig,
    "alpha_qe": AlphaQEConfig,
    "k_reciprocal": KReciprocalConfig,
}

#: group key -> its schema; `build` looks plain-value groups up here
SCHEMAS = {
    "evaluation": EvaluationConfig,
    "dataset": DatasetConfig,
    "index": IndexConfig,
    "paths": PathsConfig,
    "debug": DebugConfig,
    "parity": ParityConfig,
    "calibration": CalibrationConfig,
    **POSTPROCESS_STEPS,
}

__all__ = ["BACKENDS", "INDEX_KINDS", "ON_BAD_IMAGE", "POSTPROCESS_STEPS", "AlphaQEConfig", "AverageQEConfig",
           "DBAConfig", "DatasetConfig", "DebugConfig", "EvaluationConfig", "IndexConfig", "KReciprocalConfig",
           "CalibrationConfig", "ParityConfig", "PathsConfig", "SCHEMAS", "check_positive", "check_unit_interval"]
