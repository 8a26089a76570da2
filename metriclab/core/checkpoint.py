"""The contract for what metriclab stores in a training checkpoint beside Lightning's own keys.

Written once (training's checkpoint callback), read wherever a checkpoint is used (resume, validate, predict,
explain): everything goes through `CheckpointMeta`, so the key names live here only.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Dict, Mapping, Optional

#: the checkpoint dict's key that holds `CheckpointMeta.to_dict()`
CHECKPOINT_META_KEY = "metriclab"


@dataclass(frozen=True)
class CheckpointMeta:
    """What a metriclab checkpoint records about the run that wrote it."""

    #: the extractor's constructor config (training-only keys removed): enough to rebuild the architecture
    extractor_cfg: Optional[Dict[str, Any]] = None
    #: the training run's folder (config.yaml there tells the transforms it trained with)
    run_dir: Optional[str] = None
    #: the MLflow run the training logged to: `resume=` continues it
    mlflow_run_id: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "CheckpointMeta":
        """The metadata of a loaded checkpoint; a plain state dict (no metadata) gives all None."""
        raw = ckpt.get(CHECKPOINT_META_KEY) or {}
        if not isinstance(raw, Mapping):
            return cls()
        return cls(extractor_cfg=raw.get("extractor_cfg"), run_dir=raw.get("run_dir"),
                   mlflow_run_id=raw.get("mlflow_run_id"))
