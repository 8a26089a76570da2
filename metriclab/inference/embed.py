"""Embedding a set of images: the one path validate, predict and explain use.

The forward pass runs in the precision the model was trained in (the training run's `trainer.precision`): the
mixed precisions under `torch.autocast` on the device, as Lightning ran the run's own validation; `32-true` (or no
precision known) in plain fp32. Embeddings come back as float32 either way. An unreadable image does not stop a
batch: it is reported with its index and reason, and the caller decides whether that is fatal.
"""
from __future__ import annotations

import contextlib
from typing import Any, ContextManager, List, Optional, Sequence, Tuple

import numpy as np
import torch
from oml.const import INPUT_TENSORS_KEY
from torch.utils.data import DataLoader, Dataset

from metriclab.core.errors import ConfigError
from metriclab.core.progress import progress
from metriclab.models.tta import extract_maybe_flip

#: `trainer.precision` values -> the autocast dtype (None = plain fp32). Lightning's aliases are accepted too.
PRECISIONS = {
    "32-true": None, "32": None,
    "16-mixed": torch.float16, "16": torch.float16, "16-true": torch.float16,
    "bf16-mixed": torch.bfloat16, "bf16": torch.bfloat16, "bf16-true": torch.bfloat16,
}
DEFAULT_PRECISION = "32-true"


def resolve_device(name: Any) -> torch.device:
    """`auto` = the GPU when torch sees one, else the CPU; `cpu`, `cuda`, `cuda:1`... as given."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"`device={name}` is not a torch device; use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device={name}` but torch sees no GPU here; use device=cpu (or auto)")
    return device


def check_precision(precision: Any) -> str:
    """The precision as a `trainer.precision` string; an unsupported one is a ConfigError naming the key."""
    value = DEFAULT_PRECISION if precision is None else str(precision)
    if value not in PRECISIONS:
        raise ConfigError(f"`precision={value}` is not supported for embedding; use one of "
                          f"{sorted(k for k in PRECISIONS if '-' in k)} (null = the training run's)")
    return value


def autocast_dtype(precision: Any, device: torch.device) -> Optional[torch.dtype]:
    """The dtype autocast runs in, or None for plain fp32. fp16 autocast on a CPU becomes bf16, as Lightning does
    for `16-mixed` on a CPU trainer, so the embeddings match the run's own validation."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is torch.float16 and device.type == "cpu":
        return torch.bfloat16
    return dtype


def precision_context(precision: Any, device: torch.device) -> ContextManager:
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _SafeItems(Dataset):
    """Items of an OML dataset as (index, tensor, None) or (index, None, reason): one bad file does not stop a batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int):
        try:
            return i, self.dataset[i][INPUT_TENSORS_KEY], None
        except Exception as e:  # unreadable/undecodable file: reported by the caller with its path
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            if "_src.empty()" in msg:  # cv2's message for bytes it cannot decode
                msg = "not a decodable image"
            return i, None, f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _collate(items):
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    tensors = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensors, bad


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: Dataset, batch_size: int = 128, num_workers: int = 0,
                  precision: Any = None, flip_tta: bool = False,
                  desc: str = "embedding") -> Tuple[np.ndarray, List[int], List[Tuple[int, str]]]:
    """Embeddings of the readable items (float32 [n_ok, D], in item order), their item indices, and the failures
    as (item index, reason). Runs on the model's device in `precision` (a `trainer.precision` value). `flip_tta`:
    each embedding is the mean of the image's and its horizontal flip's (`metriclab.models.tta`). `desc` names
    the progress bar (drawn on a terminal only)."""
    model.eval()
    device = _model_device(model)
    extract = getattr(model, "extract", model)
    loader = DataLoader(_SafeItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    chunks, ok_ids, failed = [], [], []
    for ids, tensors, bad in progress(loader, desc, total=len(loader), unit="batch"):
        failed += bad
        if tensors is not None:
            with precision_context(precision, device):
                out = extract_maybe_flip(extract, tensors.to(device), flip_tta)
            chunks.append(out.detach().float().cpu().numpy())
            ok_ids += ids
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return emb.astype(np.float32, copy=False), ok_ids, failed


def list_failures(failed: Sequence[Tuple[int, str]], paths: Sequence[str], n: int = 5) -> str:
    """The first n unreadable items as `path (reason)`, and how many more."""
    shown = "; ".join(f"{paths[i]} ({reason})" for i, reason in failed[:n])
    return shown + (f"; and {len(failed) - n} more" if len(failed) > n else "")


def embed_all(model: torch.nn.Module, dataset: Dataset, paths: Sequence[str], what: str, batch_size: int = 128,
              num_workers: int = 0, precision: Any = None, hint: str = "", flip_tta: bool = False) -> np.ndarray:
    """Embeddings of every item (float32 [N, D], item order); any unreadable image is a ConfigError listing them.
    `paths[i]` names item i in the message, `what` says which images they are (e.g. "validation")."""
    emb, _, failed = embed_dataset(model, dataset, batch_size, num_workers, precision, flip_tta, f"embedding {what}")
    if failed:
        raise ConfigError(f"{len(failed)} {what} image(s) cannot be read: {list_failures(failed, paths)}{hint}")
    return emb


__all__ = ["DEFAULT_PRECISION", "PRECISIONS", "autocast_dtype", "check_precision", "embed_all", "embed_dataset",
           "list_failures", "precision_context", "resolve_device"]
