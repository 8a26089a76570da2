"""The contract for what metriclab stores in a training checkpoint beside Lightning's own keys.

Written once (training's checkpoint callback), read wherever a checkpoint is used (resume, validate, predict,
explain): everything goes through `CheckpointMeta`, so the key names live here only.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

from metriclab.core.errors import ConfigError


def previous_path(path: Path | str) -> Path:
    """Where the checkpoint `path` held before its last rewrite is kept: last.ckpt -> last.prev.ckpt (written by
    training's AtomicCheckpointIO; a resume whose checkpoint does not load falls back to it)."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


#: the checkpoint dict's key that holds `CheckpointMeta.to_dict()`
CHECKPOINT_META_KEY = "metriclab"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a metriclab checkpoint records about the run that wrote it."""

    #: the extractor's constructor config (training-only keys removed): enough to rebuild the architecture. Read
    #: from a file it is untrusted: build only what `checked_architecture` returns
    extractor_cfg: Optional[Dict[str, Any]] = None
    #: the training run's folder (config.yaml there tells the transforms it trained with)
    run_dir: Optional[str] = None
    #: the MLflow run the training logged to: `resume=` continues it
    mlflow_run_id: Optional[str] = None
    #: the calibrated distance threshold (accept a pair when its distance <= it): `threshold@fmr_<threshold_fmr>` of
    #: the validation pass this checkpoint was saved after, in `threshold_distance` (euclidean | cosine)
    threshold: Optional[float] = None
    threshold_fmr: Optional[float] = None
    threshold_distance: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "CheckpointMeta":
        """The metadata of a loaded checkpoint; a plain state dict (no metadata) gives all None."""
        raw = ckpt.get(CHECKPOINT_META_KEY) or {}
        if not isinstance(raw, Mapping):
            return cls()
        return cls(extractor_cfg=raw.get("extractor_cfg"), run_dir=raw.get("run_dir"),
                   mlflow_run_id=raw.get("mlflow_run_id"), threshold=_finite_or_none(raw.get("threshold")),
                   threshold_fmr=_finite_or_none(raw.get("threshold_fmr")),
                   threshold_distance=raw.get("threshold_distance") if isinstance(raw.get("threshold_distance"), str)
                   else None)


def _finite_or_none(value: Any) -> Optional[float]:
    """A number read from a file: a finite float, or None (missing, NaN, or not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


# ----------------------------------------------------------------------------------------------------------------------
# the stored architecture: a class name from this allow-list plus plain values, never a `_target_` to instantiate

_WEIGHTS = (str, type(None))
_BOOL = (bool,)


class _IntListMeta(type):
    def __instancecheck__(cls, value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


class IntList(metaclass=_IntListMeta):
    """A list of plain ints (isinstance checks every item): a list can hold nothing else in a stored architecture."""


_OPTIONAL_INT = (int, type(None))
_OPTIONAL_STR = (str, type(None))

#: the extractor classes a checkpoint may name, and the constructor arguments (with their plain types) each takes;
#: what is built is the path here, never a string read from a file
ALLOWED_EXTRACTORS: Dict[str, Dict[str, Tuple[type, ...]]] = {
    "oml.models.ResnetExtractor": {"weights": _WEIGHTS, "arch": (str,), "gem_p": (float, int, type(None)),
                                   "remove_fc": _BOOL, "normalise_features": _BOOL},
    "oml.models.ViTExtractor": {"weights": _WEIGHTS, "arch": (str,), "normalise_features": _BOOL,
                                "use_multi_scale": _BOOL},
    "oml.models.ViTCLIPExtractor": {"weights": _WEIGHTS, "arch": (str,), "normalise_features": _BOOL},
    "oml.models.ViTUnicomExtractor": {"weights": _WEIGHTS, "arch": (str,), "normalise_features": _BOOL,
                                      "use_gradient_ckpt": _BOOL},
    "metriclab.models.extractors.ViTWithMLPExtractor": {"weights": _WEIGHTS, "arch": (str,), "mlp_features": (IntList,),
                                                        "normalise_features": _BOOL, "use_multi_scale": _BOOL,
                                                        "train_backbone": _BOOL},
    "metriclab.models.timm_extractor.TimmExtractor": {"weights": _WEIGHTS, "arch": (str,), "pooling": _OPTIONAL_STR,
                                                      "embedding_size": _OPTIONAL_INT, "bnneck": _BOOL,
                                                      "normalise_features": _BOOL},
}
#: the same classes under their defining modules' paths (what a config may also name)
_ALIASES = {"oml.models.resnet.extractor.ResnetExtractor": "oml.models.ResnetExtractor",
            "oml.models.vit_dino.extractor.ViTExtractor": "oml.models.ViTExtractor",
            "oml.models.vit_clip.extractor.ViTCLIPExtractor": "oml.models.ViTCLIPExtractor",
            "oml.models.vit_unicom.extractor.ViTUnicomExtractor": "oml.models.ViTUnicomExtractor"}


def checked_architecture(stored: Any, source: str) -> Dict[str, Any]:
    """The constructor config of a stored architecture (`{"_target_": <class>, <argument>: <plain value>}`, or
    `"class"` for the class), after checking the class against ALLOWED_EXTRACTORS and every argument against that
    class's names and plain types. The returned `_target_` is this module's own string. Anything else (unknown
    class, unknown argument, nested mappings, non-plain values) is a ConfigError naming `source`."""
    hint = "rebuild it from the config instead: pass extractor_from_ckpt=false and the `extractor` group"
    if not isinstance(stored, Mapping):
        raise ConfigError(f"{source}: the stored extractor architecture is a {type(stored).__name__}, not a mapping; "
                          f"{hint}")
    name = stored.get("class", stored.get("_target_"))
    cls = _ALIASES.get(name, name) if isinstance(name, str) else None
    allowed = ALLOWED_EXTRACTORS.get(cls) if cls is not None else None
    if cls is None or allowed is None:
        raise ConfigError(f"{source}: the stored extractor class {name!r} is not one metriclab builds from a "
                          f"checkpoint ({sorted(ALLOWED_EXTRACTORS)}); {hint}")
    args = {k: v for k, v in stored.items() if k not in ("class", "_target_")}
    for key, value in args.items():
        types = allowed.get(key)
        if types is None:
            raise ConfigError(f"{source}: the stored extractor argument {key!r} is not one {cls} accepts "
                              f"({sorted(allowed)}); {hint}")
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ConfigError(f"{source}: the stored extractor argument {key}={value!r} is not a plain "
                              f"{' or '.join(t.__name__ for t in types)}; {hint}")
    return {"_target_": cls, **args}
