"""Which training (or validation) run a validate / explain job evaluates, filled into its config.

    python scripts/validate.py                      # the newest training run under <outputs>/train
    python scripts/validate.py run=<run dir>        # a run folder (its config.yaml)
    python scripts/explain.py run=<MLflow run id>   # a run in the MLflow store (its run_dir tag or config artifact)

The chosen run's `dataset`, `transforms`, `evaluation` and `extractor` groups replace the job's, its checkpoint
(a training run: checkpoints/best.ckpt; a validation run: the checkpoint it evaluated) and its precision fill
`ckpt` and `precision` when those are not set; every command-line override still wins. Entry points call
`resolve_run` before the heavy stack loads: this module imports neither torch nor Lightning, and MLflow only when
an MLflow run id is given.
"""
from __future__ import annotations

import json
import tempfile
import weakref
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from metriclab.core.errors import ConfigError
from metriclab.core.paths import contract_path

#: Config groups taken from the chosen run (unless given on the command line): they define what it measured.
RUN_GROUPS = ("dataset", "transforms", "evaluation", "extractor")
#: Keys of a taken group that stay the job's own: what to draw, not what is measured (validate draws a t-SNE).
JOB_OWN_KEYS = {"evaluation": ("tsne", "tsne_max_points")}
TRAIN_TASK = "train"

# configs resolve_run returned: a second call (entry point, then the job itself) leaves them as they are
_resolved: Set[int] = set()
_ABSENT = object()


def override_keys(overrides: Sequence[str]) -> List[str]:
    """The keys of Hydra command-line overrides (`a.b=1`, `+a=1`, `~a` -> `a.b`, `a`, `a`)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides]


def user_set(key: str, overrides: Sequence[str]) -> bool:
    """Whether the command line set `key` or anything under it."""
    return any(k == key or k.startswith(key + ".") for k in override_keys(overrides))


def _is_unset(cfg: DictConfig, key: str) -> bool:
    return key not in cfg or OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, "")


def _dataset_root_unset(cfg: DictConfig) -> bool:
    return "dataset" not in cfg or _is_unset(cfg.dataset, "root")


# ------------------------------------------------------------------------------------------------- finding a run
def training_runs(outputs_dir: Path) -> List[Path]:
    """Training run folders under `<outputs_dir>/train` (single and multirun jobs) holding a config.yaml and a
    checkpoints/best.ckpt, the most recently written best.ckpt first."""
    found = [ckpt.parent.parent for ckpt in (outputs_dir / TRAIN_TASK).glob("**/checkpoints/best.ckpt")
             if (ckpt.parent.parent / "config.yaml").is_file()]
    return sorted(found, key=lambda d: (d / "checkpoints" / "best.ckpt").stat().st_mtime_ns, reverse=True)


def load_run_dir(run_dir: Path, key: str = "run") -> DictConfig:
    config_yaml = run_dir / "config.yaml"
    if not config_yaml.is_file():
        raise ConfigError(f"{key}={run_dir} has no config.yaml: pass a run folder (outputs/<task>/<timestamp>) or an "
                          f"MLflow run id")
    loaded = OmegaConf.load(config_yaml)
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{config_yaml} is not a run config")
    return loaded


def _tracking_uri(cfg: DictConfig) -> str:
    logger = cfg.get("logger")
    uri = logger.get("tracking_uri") if isinstance(logger, DictConfig) else None
    if not uri:
        raise ConfigError("run=<MLflow run id> needs an MLflow store: use logger=mlflow (or set MLFLOW_TRACKING_URI), "
                          "or pass the run folder: run=outputs/<task>/<timestamp>")
    return str(uri)


def load_mlflow_run(cfg: DictConfig, run_id: str) -> Tuple[DictConfig, Optional[Path]]:
    """(config, run folder) of an MLflow run: the local config.yaml its run_dir tag names, else its config artifact."""
    from mlflow.tracking import MlflowClient  # only here: importing MLflow costs seconds

    client = MlflowClient(_tracking_uri(cfg))
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise ConfigError(f"run={run_id} is not in the MLflow store {client.tracking_uri}: pass the run id shown in "
                          f"`make ui` / `make report` (and the same logger.tracking_uri)") from e
    run_dir = Path(run.data.tags["run_dir"]) if run.data.tags.get("run_dir") else None
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return load_run_dir(run_dir), run_dir
    try:
        with tempfile.TemporaryDirectory() as tmp:
            loaded = OmegaConf.load(client.download_artifacts(run_id, "config/config.yaml", tmp))
    except Exception as e:
        raise ConfigError(f"run={run_id} has no config: neither {run_dir}/config.yaml nor the artifact "
                          f"config/config.yaml exists; pass ckpt=, dataset.root= and transforms= instead of "
                          f"run=") from e
    assert isinstance(loaded, DictConfig)
    return loaded, run_dir


def find_run(cfg: DictConfig) -> Optional[Tuple[DictConfig, Optional[Path], str]]:
    """(run config, run folder, how it was chosen) for `cfg.run`, or the newest training run when the job names
    nothing to evaluate (no run, ckpt, embeddings or dataset.root); None when the job names its own inputs."""
    run = cfg.get("run")
    if run:
        path = Path(str(run)).expanduser()
        if path.is_dir():
            return load_run_dir(path.resolve()), path.resolve(), f"run folder {path.resolve()}"
        if "/" in str(run) or path.suffix:
            raise ConfigError(f"run={run} is not a folder: pass a run folder (outputs/<task>/<timestamp>) or an "
                              f"MLflow run id")
        run_cfg, run_dir = load_mlflow_run(cfg, str(run))
        return run_cfg, run_dir, f"MLflow run {run}" + (f" ({run_dir})" if run_dir else "")
    if not _is_unset(cfg, "model"):  # an exported model: its own training run (model.json), or dataset.root=
        return None if not _dataset_root_unset(cfg) else _model_run(Path(str(cfg.model)))
    if not (_is_unset(cfg, "ckpt") and _is_unset(cfg, "embeddings") and _dataset_root_unset(cfg)):
        return None
    outputs = Path(str(cfg.paths.outputs_dir))
    runs = training_runs(outputs)
    if not runs:
        raise ConfigError(f"no training run with a best.ckpt under {outputs / TRAIN_TASK}: train first "
                          f"(python scripts/train.py dataset.root=<dataset>) or pass ckpt=<checkpoint> "
                          f"dataset.root=<dataset folder>")
    return load_run_dir(runs[0]), runs[0], f"the newest training run {runs[0]}"


def _model_run(model: Path) -> Tuple[DictConfig, Optional[Path], str]:
    """The training run an exported model's contract (model.json beside it) names, for its dataset."""
    contract = contract_path(model)
    try:
        run_dir = json.loads(contract.read_text()).get("training_run_dir")
    except (OSError, ValueError, AttributeError):
        run_dir = None
    if not run_dir or not Path(run_dir).is_dir():
        raise ConfigError(f"model={model}: its training run is unknown or gone ({contract}); pass "
                          f"dataset.root=<dataset folder> (and transforms= as in model.json)")
    return load_run_dir(Path(run_dir)), Path(run_dir), f"the training run of model={model}"


# ------------------------------------------------------------------------------------------------ filling it in
def _run_checkpoint(run_cfg: DictConfig, run_dir: Optional[Path]) -> Dict[str, Any]:
    """What the run evaluated: a training run its best.ckpt, a validation run its own ckpt / extractor choice."""
    if run_cfg.get("task") == TRAIN_TASK:
        folder = run_dir or Path(str(OmegaConf.select(run_cfg, "paths.run_dir")))
        return {"ckpt": str(folder / "checkpoints" / "best.ckpt")}
    return {"ckpt": run_cfg.get("ckpt"), "extractor_from_ckpt": run_cfg.get("extractor_from_ckpt", True)}


def _run_precision(run_cfg: DictConfig) -> Optional[str]:
    found = run_cfg.get("precision") or OmegaConf.select(run_cfg, "trainer.precision", default=None)
    return None if found is None else str(found)


def _taken_group(cfg: DictConfig, run_cfg: DictConfig, group: str, overrides: Sequence[str]) -> Any:
    """The run's `group`, with the job's own keys and every command-line override under it put back."""
    taken = OmegaConf.create(OmegaConf.to_container(run_cfg[group], resolve=False))
    own = [f"{group}.{k}" for k in JOB_OWN_KEYS.get(group, ()) if k in cfg[group]]
    for key in own + [k for k in override_keys(overrides) if k.startswith(group + ".")]:
        sub = key[len(group) + 1:]
        value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_missing=False)
        if value is _ABSENT:  # `~group.key` removed it
            if "." not in sub and isinstance(taken, DictConfig):
                taken.pop(sub, None)
            continue
        OmegaConf.update(taken, sub, value, merge=False, force_add=True)
    return taken


def fill_from_run(cfg: DictConfig, run_cfg: DictConfig, run_dir: Optional[Path], overrides: Sequence[str]) -> None:
    """Put the run's groups, checkpoint and precision into `cfg` (in place) where the command line did not."""
    with open_dict(cfg):
        for group in RUN_GROUPS:
            if group in run_cfg and group in cfg and group not in override_keys(overrides):
                cfg[group] = _taken_group(cfg, run_cfg, group, overrides)
        if _is_unset(cfg, "ckpt") and not user_set("ckpt", overrides):
            for key, value in _run_checkpoint(run_cfg, run_dir).items():
                if not user_set(key, overrides):
                    cfg[key] = value
        precision = _run_precision(run_cfg)
        if "precision" in cfg and cfg.get("precision") is None and precision and not user_set("precision", overrides):
            cfg.precision = precision


def already_resolved(cfg: DictConfig) -> bool:
    """Whether `cfg` is a config `resolve_run` returned (its run is filled in: resolving again changes nothing)."""
    return id(cfg) in _resolved


def resolve_run(cfg: DictConfig, overrides: Sequence[str] = ()) -> DictConfig:
    """The job config with the chosen run filled in (a resolved copy; `cfg` is not changed), after printing which
    run was chosen; `cfg` itself when it names its own inputs. `overrides`: the command line (Hydra's task
    overrides), whose values win over the run's. Raises ConfigError when there is nothing to evaluate."""
    if id(cfg) in _resolved:
        return cfg
    found = find_run(cfg)
    if found is not None:
        run_cfg, run_dir, chosen = found
        copied = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # one timestamp, one run dir
        assert isinstance(copied, DictConfig)
        cfg = copied
        fill_from_run(cfg, run_cfg, run_dir, overrides)
        root = OmegaConf.select(cfg, "dataset.root", default=None, throw_on_missing=False)
        print(f"{cfg.get('task', 'job')}: evaluating {chosen}: ckpt {cfg.get('ckpt')}, dataset {root}", flush=True)
        _resolved.add(id(cfg))
        weakref.finalize(cfg, _resolved.discard, id(cfg))
    if _dataset_root_unset(cfg):
        raise ConfigError("`dataset.root` is not set: pass run=<run folder or MLflow run id> (its dataset is used) "
                          "or dataset.root=<converted dataset folder>")
    return cfg


__all__ = ["JOB_OWN_KEYS", "RUN_GROUPS", "already_resolved", "fill_from_run", "find_run", "load_mlflow_run",
           "load_run_dir", "override_keys", "resolve_run", "training_runs", "user_set"]
