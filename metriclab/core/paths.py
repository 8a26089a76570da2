"""The repository root, resolved once, so every path in configs and outputs is absolute; where an exported model's
contract lies."""
from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
OUTPUTS_DIR = REPO_ROOT / "outputs"
CONFIGS_DIR = REPO_ROOT / "configs"


def contract_path(model: Path | str) -> Path:
    """model.onnx -> model.json: an exported model's preprocessing contract is the file beside it with the same stem
    (written by metriclab.inference.export; read by the onnxruntime model and by run resolution, torch-free)."""
    return Path(model).with_suffix(".json")
