"""Config helpers: the `repo_root` resolver, `build` (the one way every config group becomes an object), flattening.

`build` turns a group with a `_target_` into that object by Hydra instantiation (the target's signature is the
schema: an unknown key fails), and a plain-value group into its dataclass from `metriclab.core.schemas` (an
unknown or misspelt key, a wrong type or a missing value fails, naming the key). Runtime-only values (labels for a
sampler, the number of classes and the embedding size for a loss, parameters for an optimizer) are passed at build
time, and only to targets whose signature declares them, so YAML never hard-codes them and an unknown key still
fails. The resolvers registered here give the YAML facts defined once in Python (`${repo_root:}`, the MLflow store).
"""
from __future__ import annotations

import datetime as dt
import functools
import inspect
import threading
from pathlib import Path
from typing import Any, Callable, Container, Dict, Iterator, List, Tuple

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from metriclab.core.constants import artifact_root, mlflow_store_uri
from metriclab.core.errors import ConfigError
from metriclab.core.paths import REPO_ROOT
from metriclab.core.schemas import SCHEMAS

#: `${run_timestamp:}`: the run folder's and run name's time stamp, down to the microsecond
RUN_TIMESTAMP_FORMAT = "%Y-%m-%d_%H-%M-%S_%f"
_stamp_lock = threading.Lock()
_last_stamp = [dt.datetime.min]


def run_timestamp() -> str:
    """Now, as a run folder name: microseconds, so two jobs started in the same second never share a folder, and
    strictly increasing within a process, so neither do two configs composed one right after the other."""
    with _stamp_lock:
        _last_stamp[0] = max(dt.datetime.now(), _last_stamp[0] + dt.timedelta(microseconds=1))
        return _last_stamp[0].strftime(RUN_TIMESTAMP_FORMAT)


#: resolvers the YAML uses for facts defined once in Python: `${repo_root:}`, `${default_mlflow_uri:}`, ...
RESOLVERS: Dict[str, Callable[..., Any]] = {
    "repo_root": lambda: str(REPO_ROOT),
    # `${mlflow_store_uri:${paths.outputs_dir}}`: the embedded store of that outputs folder (core/constants.py)
    "mlflow_store_uri": lambda outputs_dir: mlflow_store_uri(outputs_dir),
    "artifact_root": lambda outputs_dir: str(artifact_root(outputs_dir)),
}
for _name, _resolver in RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
if not OmegaConf.has_resolver("run_timestamp"):  # cached: a config reads one time stamp however often it asks
    OmegaConf.register_new_resolver("run_timestamp", run_timestamp, use_cache=True)


def _signature_params(target: Any) -> Dict[str, inspect.Parameter]:
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):  # builtins without a signature: pass nothing extra
        return {}


def runtime_kwargs(target: Any, runtime: Dict[str, Any], already_set: Container[str]) -> Dict[str, Any]:
    """The runtime kwargs `target` declares and the YAML (`already_set`) did not set; `**kwargs` does not count: a
    runtime value goes only where it is declared."""
    params = _signature_params(target)
    return {k: v for k, v in runtime.items() if k in params and k not in already_set}


def build_plain(node: Any, key: str, schema: type, allow_missing: bool = False) -> Any:
    """`node` checked against the dataclass `schema` and returned as an instance of it; with `allow_missing` an
    unset mandatory value (`???`) is accepted and the checked DictConfig is returned instead."""
    if node is None:
        node = {}
    elif isinstance(node, DictConfig):
        try:  # interpolations such as ${paths.outputs_dir} resolve against the whole config, not the schema
            node = OmegaConf.to_container(node, resolve=True)
        except OmegaConfBaseException as e:
            raise ConfigError(f"`{key}.{e.full_key}`: {str(e.msg).splitlines()[0]}") from e
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except ConfigKeyError as e:
        allowed = ", ".join(OmegaConf.structured(schema).keys())
        raise ConfigError(f"`{key}.{e.key}` is not a key of `{key}`: check its spelling (allowed: {allowed})") from e
    except ValidationError as e:  # full_key names a list item too (cmc_top_k[0])
        raise ConfigError(f"`{key}.{e.full_key or e.key}`: {str(e.msg).splitlines()[0]}") from e
    if allow_missing:
        return merged
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(f"`{key}.{missing[0]}` is not set: pass {key}.{missing[0]}=<value>")
    return OmegaConf.to_object(merged)


def build(node: DictConfig, key: str, **runtime: Any) -> Any:
    """Build the config group `node` (its config key is `key`, used in errors). A plain-value group (its last key
    names a schema in `metriclab.core.schemas`) becomes its dataclass; a `_target_` group is instantiated, getting
    only the runtime kwargs its target declares and the YAML does not already set."""
    group = key.rsplit(".", 1)[-1]
    if group in SCHEMAS and (node is None or "_target_" not in node):
        if runtime:
            raise TypeError(f"build({key!r}): a plain-value group takes no runtime values, got {sorted(runtime)}")
        return build_plain(node, key, SCHEMAS[group])
    if node is None or "_target_" not in node:
        raise ConfigError(f"`{key}` needs a `_target_` (the class or function to build); got {node!r}")
    try:
        target = get_object(node._target_)
    except Exception as e:  # hydra wraps import errors; keep the key in the message
        raise ConfigError(f"`{key}._target_={node._target_}` cannot be imported: {e}") from e
    extra = runtime_kwargs(target, runtime, node)
    # plain lists/dicts for the YAML values: libraries type-check them (neptune, albumentations)
    convert = {} if "_convert_" in node else {"_convert_": "all"}
    try:
        if not extra:
            return instantiate(node, **convert)
        # runtime values go to the target directly, not through OmegaConf: a 60k-label list costs ~4 s there
        built = instantiate(node, _partial_=True, **convert)
    except InstantiationException as e:
        raise ConfigError(f"`{key}` could not be built: {e}") from e
    if node.get("_partial_"):
        return functools.partial(built, **extra)
    try:
        return built(**extra)
    except Exception as e:  # the target's own complaint (a bad value, an unknown key), with the config key
        raise ConfigError(f"`{key}` could not be built: {node._target_}: {type(e).__name__}: {e}") from e


def flatten(cfg: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Yield `a.b.c -> value` pairs of a resolved config (lists are kept as one value)."""
    if isinstance(cfg, (DictConfig, dict)):
        items = cfg.items() if isinstance(cfg, dict) else cfg.items_ex(resolve=True)
        for k, v in items:
            yield from flatten(v, f"{prefix}{k!s}.")
    elif isinstance(cfg, ListConfig):
        yield prefix[:-1], OmegaConf.to_container(cfg, resolve=True)
    else:
        yield prefix[:-1], cfg


def config_name_of(cfg: DictConfig) -> str:
    """`config_name`, else the primary config Hydra composed (`--config-name`), else the task: what names the run
    and its `config_name` tag."""
    name = cfg.get("config_name")
    if not name:
        try:
            from hydra.core.hydra_config import HydraConfig

            name = HydraConfig.get().job.config_name
        except ValueError:  # not started by @hydra.main (tests, notebooks)
            pass
    return str(name or cfg.get("task") or "unknown")


def job_identity(cfg: DictConfig) -> Tuple[Path, str, List[str]]:
    """Run dir, run name `<config-name>-<timestamp>[-<job number>]` and the command-line overrides."""
    run_dir = Path(cfg.paths.run_dir)
    config_name = config_name_of(cfg)
    overrides: List[str] = []
    suffix = ""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            suffix = f"-{hc.job.num}"
    except ValueError:  # not started by @hydra.main (tests, notebooks): the config carries what we need
        pass
    return run_dir, f"{config_name}-{cfg.timestamp}{suffix}", overrides
