"""An exported ONNX model (`scripts/export.py`) run by onnxruntime behind the nn.Module interface the embedding path
uses (`embed_all` / `embed_dataset` call `.extract(images)` and read the device from the parameters: there are none,
so the images stay on the CPU and onnxruntime moves them to its own device).

The model's preprocessing contract is `model.json` beside the `.onnx` file (metriclab.inference.export writes both):
the val transform to build, the input size, whether flip TTA is inside the graph. Every problem with the pair (a
missing or truncated file, not an ONNX model, images of another shape) is one ConfigError naming the file.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from metriclab.core.errors import ConfigError
from metriclab.core.paths import contract_path

log = logging.getLogger(__name__)

#: the contract keys a model.json must hold for validate / predict to run the model
REQUIRED_CONTRACT_KEYS = ("input_name", "output_name", "input_size", "embedding_size", "transforms_val")


def read_contract(model: Path | str) -> Dict[str, Any]:
    """The preprocessing contract of `model` (a ConfigError naming the file when it is missing or not one)."""
    model = Path(model)
    if not model.is_file():
        raise ConfigError(f"model={model} does not exist: pass the model.onnx written by scripts/export.py")
    path = contract_path(model)
    if not path.is_file():
        raise ConfigError(f"model={model}: its preprocessing contract {path} is missing (scripts/export.py writes "
                          f"both files; copy them together)")
    try:
        contract = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is not a readable model.json: {type(e).__name__}: {e}") from e
    missing = [k for k in REQUIRED_CONTRACT_KEYS if not isinstance(contract, dict) or k not in contract]
    if missing:
        raise ConfigError(f"{path} is not a metriclab model.json: missing {missing}; re-export the model")
    return contract


def with_model_contract(cfg: DictConfig) -> DictConfig:
    """`cfg` (a copy) with `transforms.val` from the contract of `cfg.model`: an ONNX model is run with the val
    transform it was exported with. A configured transform that differs is reported, then replaced."""
    contract = read_contract(cfg.model)
    theirs = contract["transforms_val"]
    ours = OmegaConf.to_container(cfg.transforms.val, resolve=True) if "transforms" in cfg else None
    if ours is not None and ours != theirs:
        log.warning("transforms.val differs from the model's contract (%s): %s vs %s; the contract's is used",
                    contract_path(cfg.model), ours, theirs)
    copied = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    assert isinstance(copied, DictConfig)
    with open_dict(copied):
        if "transforms" not in copied or copied.transforms is None:
            copied.transforms = {}
        copied.transforms.val = theirs
    return copied


def onnx_providers(device: Any) -> List[str]:
    """onnxruntime's execution providers for `device` (auto | cpu | cuda[:N]): CUDA when asked for (auto: when
    onnxruntime has it), the CPU always as the fallback."""
    import onnxruntime as ort

    name = str(device or "auto")
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if name.startswith("cuda") and not has_cuda:
        raise ConfigError(f"`device={name}` but this onnxruntime has no CUDAExecutionProvider "
                          f"({ort.get_available_providers()}); use device=cpu (or auto)")
    if name != "cpu" and has_cuda and (name != "auto" or torch.cuda.is_available()):
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def open_session(model: Path | str, providers: List[str], threads: int = 0) -> Any:
    """An InferenceSession of `model`; a file onnxruntime cannot read is a ConfigError naming it."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads)  # 0 = onnxruntime's default (all cores)
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: a truncated file is reported by us, once
    try:
        return ort.InferenceSession(str(model), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime's own exception types differ by build
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"model={model} is not an ONNX model onnxruntime can load (truncated, or another kind of "
                          f"file): {type(e).__name__}: {msg}") from e


class OnnxExtractor(torch.nn.Module):
    """An onnxruntime session as an extractor: `extract(images [B, 3, H, W] float32) -> embeddings [B, D]`."""

    def __init__(self, model: Path | str, contract: Dict[str, Any], providers: List[str], threads: int = 0):
        super().__init__()
        self.path = Path(model)
        self.contract = contract
        self.session = open_session(self.path, providers, threads)
        self.input_name = str(contract["input_name"])
        self.output_name = str(contract["output_name"])
        self.input_shape: Tuple[int, int, int] = (3, *[int(v) for v in contract["input_size"]])  # type: ignore
        self.feat_dim = int(contract["embedding_size"])
        names = [i.name for i in self.session.get_inputs()]
        if self.input_name not in names:
            raise ConfigError(f"model={self.path} has inputs {names}, its contract {contract_path(self.path)} says "
                              f"{self.input_name!r}: the two files do not belong together")

    @property
    def providers(self) -> List[str]:
        return list(self.session.get_providers())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ConfigError(f"model={self.path} takes images N x {' x '.join(map(str, self.input_shape))} "
                              f"(float32 NCHW, its contract {contract_path(self.path)}), got "
                              f"{' x '.join(map(str, images.shape))}: use the contract's transforms")
        batch = np.ascontiguousarray(images.detach().float().cpu().numpy())
        out = self.session.run([self.output_name], {self.input_name: batch})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    def extract(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward(images)


def load_onnx_extractor(model: Path | str, device: Any = "auto") -> OnnxExtractor:
    """The ONNX model at `model` with its contract, on onnxruntime's provider for `device`, with torch's CPU thread
    count (`num_threads` of the job)."""
    contract = read_contract(model)
    return OnnxExtractor(model, contract, onnx_providers(device), torch.get_num_threads())


__all__ = ["OnnxExtractor", "REQUIRED_CONTRACT_KEYS", "load_onnx_extractor", "onnx_providers",
           "open_session", "read_contract", "with_model_contract"]
