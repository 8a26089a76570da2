"""Plain-value groups (evaluation, dataset, index, paths) are built into their dataclass schemas by
`metriclab.core.config.build`: a misspelt key, a wrong type or an unsupported value is a ConfigError naming it."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.schemas import (
    SCHEMAS,
    AlphaQEConfig,
    AverageQEConfig,
    CalibrationConfig,
    DatasetConfig,
    DBAConfig,
    DebugConfig,
    EvaluationConfig,
    IndexConfig,
    KReciprocalConfig,
    ParityConfig,
    PathsConfig,
)
from metriclab.jobs.checks import check_config
from tests.helpers import compose_cfg

PRIMARY_OF = {"evaluation": "train", "dataset": "train", "index": "predict", "paths": "train"}
#: what each primary needs set besides the dataset, so that only the key under test is wrong
NEEDS = {"train": [], "predict": ["ckpt=null", "images=/nowhere", "index=hnsw"]}


def base(tmp_path: Path):
    return [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run", f"dataset.root={tmp_path}"]


def test_every_plain_group_has_a_schema():
    # the postprocess group maps step names to steps: each step (postprocess.<name>) is built into its schema
    assert SCHEMAS == {"evaluation": EvaluationConfig, "dataset": DatasetConfig, "index": IndexConfig,
                       "paths": PathsConfig, "debug": DebugConfig, "parity": ParityConfig,
                       "calibration": CalibrationConfig,
                       "dba": DBAConfig, "aqe": AverageQEConfig, "alpha_qe": AlphaQEConfig,
                       "k_reciprocal": KReciprocalConfig}


def test_groups_build_into_their_schemas_with_the_yaml_values(tmp_path):
    cfg = compose_cfg("train", base(tmp_path) + ["evaluation.distance=cosine", "dataset.cache_size=7"])
    evaluation = build(cfg.evaluation, "evaluation")
    assert isinstance(evaluation, EvaluationConfig)
    assert (evaluation.distance, evaluation.cmc_top_k, evaluation.tsne) == ("cosine", [1, 5, 10], False)
    assert build(cfg.dataset, "dataset") == DatasetConfig(root=str(tmp_path), csv="dataset.csv", cache_size=7)
    paths = build(cfg.paths, "paths")  # interpolations resolve against the whole config
    assert paths.mlflow_uri == f"sqlite:///{tmp_path}/mlflow.db" and paths.mlartifacts == f"{tmp_path}/mlartifacts"
    index = build(compose_cfg("predict", base(tmp_path) + ["index=hnsw"]).index, "index")
    assert index == IndexConfig(kind="hnsw", m=32, ef_construction=200, ef_search=128)


@pytest.mark.parametrize("group, key", [("evaluation", "distanse"), ("dataset", "rooot"), ("index", "ef_serch"),
                                        ("paths", "output_dir")])
def test_misspelt_key_on_the_command_line_is_an_error_naming_it(tmp_path, group, key):
    cfg = compose_cfg(PRIMARY_OF[group], base(tmp_path) + NEEDS[PRIMARY_OF[group]] + [f"+{group}.{key}=1"])
    with pytest.raises(ConfigError, match=rf"`{group}\.{key}` is not a key of `{group}`: check its spelling"):
        build(cfg[group], group)
    with pytest.raises(ConfigError, match=rf"`{group}\.{key}` is not a key of `{group}`"):
        check_config(cfg)  # what the entry points run before any job


@pytest.mark.parametrize("group, key", [("evaluation", "distanse"), ("dataset", "rooot"), ("index", "ef_serch"),
                                        ("paths", "output_dir")])
def test_misspelt_key_in_a_yaml_file_is_an_error_naming_it(tmp_path, group, key):
    node = OmegaConf.load(Path(__file__).parents[1] / "configs" / group / ("flat.yaml" if group == "index"
                                                                          else "default.yaml" if group != "dataset"
                                                                          else "csv.yaml"))
    (tmp_path / f"{group}.yaml").write_text(OmegaConf.to_yaml(node) + f"{key}: 1\n")
    typo = OmegaConf.load(tmp_path / f"{group}.yaml")
    if group == "paths":  # its interpolations need the whole config: check the typo on plain values
        typo = OmegaConf.create({k: "/x" for k in typo.keys()})
    if group == "dataset":
        typo.root = "/data"
    with pytest.raises(ConfigError, match=rf"`{group}\.{key}` is not a key of `{group}`"):
        build(typo, group)


@pytest.mark.parametrize("group, override, message", [
    ("evaluation", "evaluation.worst_queries=many", r"`evaluation.worst_queries`: Value 'many' .*Integer"),
    ("evaluation", "evaluation.tsne=maybe", r"`evaluation.tsne`: Value 'maybe' is not a valid bool"),
    ("evaluation", "evaluation.cmc_top_k=[one]",
     r"`evaluation.cmc_top_k\[0\]`: Value 'one' of type 'str' could not be converted to Integer"),
    ("dataset", "dataset.cache_size=lots", r"`dataset.cache_size`: Value 'lots' .*Integer"),
    ("dataset", "dataset.allow_outside_root=perhaps", r"`dataset.allow_outside_root`: Value 'perhaps' is not a valid "
                                                       r"bool"),
    ("index", "index.m=wide", r"`index.m`: Value 'wide' .*Integer"),
])
def test_wrong_type_is_an_error_naming_the_key(tmp_path, group, override, message):
    cfg = compose_cfg(PRIMARY_OF[group], base(tmp_path) + NEEDS[PRIMARY_OF[group]] + [override])
    with pytest.raises(ConfigError, match=message):
        build(cfg[group], group)


@pytest.mark.parametrize("override, message", [
    ("evaluation.distance=cosin",
     r"`evaluation.distance=cosin` is not supported; choose one of \['euclidean', 'cosine'\]"),
    ("evaluation.backend=faiss",
     r"`evaluation.backend=faiss` is not supported; choose one of \['exact', 'faiss-flat', 'faiss-hnsw'\]"),
])
def test_unsupported_value_is_an_error_listing_the_choices(tmp_path, override, message):
    cfg = compose_cfg("train", base(tmp_path) + [override])
    with pytest.raises(ConfigError, match=message):
        build(cfg.evaluation, "evaluation")


def test_dataset_read_checks_build_with_their_yaml_defaults_and_choices(tmp_path):
    cfg = compose_cfg("train", base(tmp_path) + ["dataset.allow_outside_root=true", "dataset.on_bad_image=skip"])
    dataset = build(cfg.dataset, "dataset")
    assert (dataset.allow_outside_root, dataset.on_bad_image) == (True, "skip")
    defaults = build(compose_cfg("train", base(tmp_path)).dataset, "dataset")
    assert (defaults.allow_outside_root, defaults.on_bad_image) == (False, "error")
    cfg = compose_cfg("train", base(tmp_path) + ["dataset.on_bad_image=drop"])
    with pytest.raises(ConfigError, match=r"`dataset.on_bad_image=drop` is not supported; choose one of "
                                          r"\['error', 'skip'\]"):
        build(cfg.dataset, "dataset")


def test_unset_mandatory_value_is_an_error_naming_it(tmp_path):
    cfg = compose_cfg("train", [f"paths.outputs_dir={tmp_path}", f"paths.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError, match=r"`dataset.root` is not set: pass dataset.root=<value>"):
        build(cfg.dataset, "dataset")
