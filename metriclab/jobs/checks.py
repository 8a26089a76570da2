"""Checks of a composed config before any job starts: cheap (torch-free) and each failure a `ConfigError` naming the
key or the file and saying what to do.

- no mandatory value (`???`) is left unset;
- every plain-value group builds against its schema (`metriclab.core.schemas`): a misspelt key or a wrong type;
- no top-level key the task's primary config (configs/<task>.yaml) does not declare (`+lr=...` instead of
  `optimizer.lr=...`);
- the files and folders the config names exist: the dataset folder and its CSV, checkpoints, the run to resume,
  precomputed embeddings, predict's images and gallery.

`_target_` groups (extractor, criterion, ...) are checked by `build` when the job builds them: their schema is the
target's signature, which needs the heavy import.
"""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any, Iterator, List, Optional, Set

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from metriclab.core.checkpoint import previous_path
from metriclab.core.config import build, build_plain
from metriclab.core.errors import ConfigError
from metriclab.core.paths import CONFIGS_DIR
from metriclab.core.schemas import SCHEMAS
from metriclab.data.contract import check_dataset_location

#: what to pass for a missing mandatory value, by key (others get `<key>=<value>`)
MISSING_HINTS = {
    "dataset.root": "dataset.root=<the folder holding the converted dataset's CSV> (make convert-market/"
                    "convert-cars/convert-fruits DATA=<folder> writes it)",
    "ckpt": "ckpt=<checkpoint file, e.g. outputs/train/<timestamp>/checkpoints/best.ckpt> (or ckpt=null for the "
            "extractor's own weights)",
    "images": "images=<an image file, a folder or a quoted glob such as 'photos/*.jpg'>",
}


def missing_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of unset mandatory values (`???`), without resolving interpolations (`${hydra:...}` cannot be
    resolved outside a Hydra run, and resolving is not needed to see a `???`)."""
    if isinstance(node, DictConfig):
        keys: Any = node.keys()
    elif isinstance(node, ListConfig):
        keys = range(len(node))
    else:
        return
    for key in keys:
        full = f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            yield full
        elif not OmegaConf.is_interpolation(node, key):
            yield from missing_keys(node[key], f"{full}.")


def predict_uses_folder_gallery(cfg: DictConfig) -> bool:
    """predict with `gallery=<folder>` needs no dataset."""
    return cfg.get("task") == "predict" and bool(cfg.get("gallery"))


def check_missing(cfg: DictConfig) -> None:
    optional = {"dataset.root"} if predict_uses_folder_gallery(cfg) else set()
    if cfg.get("task") == "predict" and "model" in cfg and not OmegaConf.is_missing(cfg, "model") and cfg.model:
        optional.add("ckpt")  # model=<model.onnx> names the model: no checkpoint is needed
    missing = [k for k in missing_keys(cfg) if k not in optional and not k.startswith("hydra.")]
    if missing:
        key = missing[0]
        more = f" (also unset: {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(f"`{key}` is not set: pass {MISSING_HINTS.get(key, f'{key}=<value>')}{more}")


def check_groups(cfg: DictConfig) -> None:
    """Every plain-value group present builds against its schema."""
    for group, schema in SCHEMAS.items():
        node = cfg.get(group)
        if node is None or "_target_" in node:
            continue
        if group == "dataset" and predict_uses_folder_gallery(cfg):
            build_plain(node, group, schema, allow_missing=True)  # its root may stay unset
        else:
            build(node, group)


def declared_keys(task: str) -> Set[str]:
    """The top-level keys configs/<task>.yaml declares: its own keys and the groups of its defaults list."""
    primary = CONFIGS_DIR / f"{task}.yaml"
    if not primary.is_file():
        raise ConfigError(f"`task={task}` has no primary config {primary}: one of "
                          f"{sorted(p.stem for p in CONFIGS_DIR.glob('*.yaml') if '_' not in p.stem)}")
    raw = OmegaConf.load(primary)
    assert isinstance(raw, DictConfig)  # a primary config is a mapping
    keys = {str(k) for k in raw.keys() if k != "defaults"}
    for entry in raw.get("defaults", []):
        if isinstance(entry, (DictConfig, dict)):
            for group in entry.keys():
                keys.add(str(group).replace("override ", "").strip().lstrip("/").split("@")[0])
    return keys | {"hydra"}


def check_top_level_keys(cfg: DictConfig) -> None:
    task = str(cfg.get("task"))
    allowed = declared_keys(task)
    unknown = sorted(str(k) for k in cfg.keys() if k not in allowed)
    if unknown:
        raise ConfigError(f"`{unknown[0]}` is not a key of the {task} config (configs/{task}.yaml): check its "
                          f"spelling or put it under its group, e.g. optimizer.lr "
                          f"(allowed: {', '.join(sorted(allowed))})")


def set_value(cfg: DictConfig, key: str) -> Optional[Any]:
    """`cfg.<key>` when present and set (not null, not `???`), else None."""
    if key not in cfg or OmegaConf.is_missing(cfg, key):
        return None
    return cfg.get(key)


def require_file(key: str, value: Any, what: str) -> None:
    if not Path(str(value)).is_file():
        raise ConfigError(f"{key}={value} does not exist: pass {what}")


def image_specs(images: Any) -> List[str]:
    if isinstance(images, (ListConfig, list, tuple)):
        return [str(i) for i in images]
    return [str(images)]


def check_images(key: str, images: Any) -> None:
    """predict's `images`: each item an existing file or folder, or a glob matching something."""
    for spec in image_specs(images):
        if glob.has_magic(spec):
            if not glob.glob(spec, recursive=True):
                raise ConfigError(f"{key}={spec}: the pattern matches no file")
        elif not Path(spec).exists():
            raise ConfigError(f"{key}={spec} does not exist: pass an image file, a folder or a quoted glob pattern")


def check_files(cfg: DictConfig) -> None:
    """The files and folders the config names exist (the job reads them later, after the heavy imports)."""
    task = cfg.get("task")
    dataset = cfg.get("dataset")
    if dataset is not None and set_value(dataset, "root") is not None:
        check_dataset_location(dataset.root, dataset.get("csv") or "dataset.csv")
    for key in ("ckpt", "ckpt_path"):
        if set_value(cfg, key) is not None:
            require_file(key, cfg[key], "an existing checkpoint file (e.g. outputs/train/<timestamp>/checkpoints/"
                                        "best.ckpt)")
    if task in ("validate", "predict") and set_value(cfg, "model") is not None:
        require_file("model", cfg.model, "an exported model.onnx (python scripts/export.py ckpt=<best.ckpt>)")
    resume = set_value(cfg, "resume")
    if resume is not None:
        last = Path(str(resume)) / "checkpoints" / "last.ckpt"
        if not Path(str(resume)).is_dir():
            raise ConfigError(f"resume={resume} is not a folder: pass the run directory of a training run "
                              f"(outputs/train/<timestamp>)")
        if not last.is_file() and not previous_path(last).is_file():  # train falls back to last.prev.ckpt
            raise ConfigError(f"resume={resume}: {last} does not exist (a run keeps last.ckpt after its first "
                              f"epoch); pass the run directory of a training run")
    if set_value(cfg, "embeddings") is not None:
        require_file("embeddings", cfg.embeddings, "an .npz written by export_embeddings=true")
    if task == "predict":
        if set_value(cfg, "images") is not None:
            check_images("images", cfg.images)
        gallery = set_value(cfg, "gallery")
        if gallery is not None and not Path(str(gallery)).is_dir():
            raise ConfigError(f"gallery={gallery} is not a folder: pass a folder with one sub-folder per class")


def hydra_launcher() -> Optional[DictConfig]:
    """`hydra.launcher` of this job (None outside @hydra.main)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().launcher
    except ValueError:
        return None


def check_launcher(cfg: DictConfig, launcher: Optional[DictConfig] = None) -> None:
    """A submitit launcher (hydra/launcher=slurm|submitit_local) starts `nodes x tasks_per_node` processes per job;
    Lightning's DDP expects `trainer.num_nodes x trainer.devices` of them, one per device: they must agree."""
    launcher = hydra_launcher() if launcher is None else launcher
    trainer = cfg.get("trainer")
    if launcher is None or trainer is None or "tasks_per_node" not in launcher:
        return  # Hydra's basic launcher: Lightning starts the processes itself
    num_nodes, devices = trainer.get("num_nodes", 1), trainer.get("devices", 1)
    try:  # the launcher's keys interpolate the trainer's: `devices=auto` or a list does not fit its integers
        nodes, tasks, gpus = launcher.get("nodes"), launcher.get("tasks_per_node"), launcher.get("gpus_per_node")
    except OmegaConfBaseException as e:
        raise ConfigError(f"hydra.launcher cannot follow trainer.devices={devices}, trainer.num_nodes={num_nodes} "
                          f"({' '.join(str(e).split())}): give integers, the devices (processes) per node and the "
                          f"nodes") from e
    if "LocalLauncher" in str(launcher.get("_target_", "")):
        if (nodes, tasks, devices, num_nodes) != (1, 1, 1, 1):
            raise ConfigError(f"hydra/launcher=local runs one process per job (hydra.launcher.nodes={nodes}, "
                              f"tasks_per_node={tasks}, trainer.devices={devices}, trainer.num_nodes={num_nodes}): "
                              f"it cannot start DDP's processes; use trainer.devices=1, or hydra/launcher=slurm")
        return
    if not isinstance(devices, int) or isinstance(devices, bool):
        raise ConfigError(f"trainer.devices={devices}: under hydra/launcher=slurm give the number of devices per node "
                          f"(an integer): SLURM starts that many processes on each node")
    if nodes != num_nodes:
        raise ConfigError(f"hydra.launcher.nodes={nodes} but trainer.num_nodes={num_nodes}: Lightning's DDP needs "
                          f"one process per device on every node; set trainer.num_nodes (the launcher follows it)")
    if tasks != devices:
        raise ConfigError(f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: one process per "
                          f"device; set trainer.devices (the launcher's tasks_per_node and gpus_per_node follow it)")
    if trainer.get("accelerator") in ("gpu", "cuda") and gpus is not None and gpus != devices:
        raise ConfigError(f"hydra.launcher.gpus_per_node={gpus} but trainer.devices={devices}: reserve one GPU per "
                          f"process; set trainer.devices (the launcher follows it)")


def check_config(cfg: DictConfig) -> None:
    """All the checks, cheapest first; raises the first ConfigError."""
    check_missing(cfg)
    check_top_level_keys(cfg)
    check_groups(cfg)
    check_files(cfg)
    check_launcher(cfg)


__all__ = ["check_config", "check_files", "check_groups", "check_launcher", "check_missing", "check_top_level_keys",
           "declared_keys", "missing_keys"]
