"""The engine's input checks: embeddings, labels, ids, sequences and categories of both sides, each error naming
the argument (``query_labels``, ``gallery_embeddings``, ...) and what to do about it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from metriclab.evaluation.spec import RetrievalSide

# Rows of embeddings per chunk in whole-matrix passes (squared norms, pcf covariance, finiteness report).
CHUNK_ROWS = 8192


def as_embeddings(x: Any, name: str) -> torch.Tensor:
    """`x` as a contiguous float32 CPU tensor [n, dim] with finite values whose distances cannot overflow."""
    if isinstance(x, torch.Tensor):
        t = x.detach().cpu()
    else:
        try:
            arr = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - re-raised with the argument name
            raise TypeError(f"{name} must be a torch.Tensor or numpy array of floats, got {type(x).__name__}") from e
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold real numbers, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D [n_items, dim], got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows): evaluation needs at least one item on each side")
    if t.shape[1] == 0:
        raise ValueError(f"{name} has 0 columns: embeddings need at least one dimension")
    t = t.to(torch.float32).contiguous()
    low, high = (float(v) for v in torch.aminmax(t))  # one pass, no copy: NaN propagates, inf shows
    if not (math.isfinite(low) and math.isfinite(high)):
        finite_rows = torch.cat([torch.isfinite(c).all(dim=1) for c in t.split(CHUNK_ROWS)])
        bad = torch.nonzero(~finite_rows).flatten()[:5].tolist()
        raise ValueError(
            f"{name} has NaN/inf values in rows {bad} (first shown of {int((~finite_rows).sum())}); "
            "fix the model/embeddings (e.g. a diverged checkpoint) before evaluating"
        )
    # |q - g|^2 must stay finite in float32 (an inf distance would read as an excluded pair)
    limit = math.sqrt(torch.finfo(torch.float32).max / (4 * t.shape[1]))
    if max(-low, high) > limit:
        raise ValueError(
            f"{name} has values up to {max(-low, high):.3g}; float32 distances overflow above {limit:.3g} "
            f"for dim {t.shape[1]}: rescale the embeddings"
        )
    return t


def to_numpy_1d(x: Any, name: str, n: int, side: str) -> np.ndarray:
    """`x` as a 1-D numpy array of `n` values (lists become object arrays: ids and sequences may be strings)."""
    if isinstance(x, torch.Tensor):
        arr = x.detach().cpu().numpy()
    elif isinstance(x, (pd.Series, pd.Index)):
        arr = x.to_numpy()
    else:
        arr = np.asarray(x) if not isinstance(x, (list, tuple)) else np.asarray(x, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per {side} item), got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"{name} has {len(arr)} entries but {side}_embeddings has {n} rows; they must match")
    return arr


def as_labels(x: Any, name: str, n: int, side: str) -> np.ndarray:
    """`x` as int64 labels; whole floats are accepted, anything else is a TypeError."""
    if x is None:
        raise ValueError(f"{name} is required (one integer label per {side} item)")
    arr = to_numpy_1d(x, name, n, side)
    if arr.dtype == object:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"{name} must be integers, got non-numeric values such as {arr[:3].tolist()}") from e
    if arr.dtype.kind in "iu":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f" and np.isfinite(arr).all() and (arr == np.round(arr)).all():
        return arr.astype(np.int64)
    raise TypeError(f"{name} must be integers, got dtype {arr.dtype} (e.g. {arr[:3].tolist()})")


def squared_norms(x: torch.Tensor) -> torch.Tensor:
    """Row sums of squares, in chunks so no N×D temporary is made."""
    return torch.cat([(c * c).sum(1) for c in x.split(CHUNK_ROWS)])


def joint_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The float32 mean row of `a` and `b` together, summed in float64 chunks (no N×D temporary)."""
    total = torch.zeros(a.shape[1], dtype=torch.float64)
    for chunk in (*a.split(CHUNK_ROWS), *b.split(CHUNK_ROWS)):
        total += chunk.double().sum(0)
    return (total / (a.shape[0] + b.shape[0])).to(torch.float32)


def unit_rows(x: torch.Tensor, name: str) -> torch.Tensor:
    """Rows scaled to unit length (for cosine distance); a zero row is an error naming it."""
    norms = torch.linalg.vector_norm(x, dim=1)
    if bool((norms == 0).any()):
        bad = torch.nonzero(norms == 0).flatten()[:5].tolist()
        raise ValueError(f"{name} rows {bad} have zero norm: cosine distance is undefined for them")
    return x / norms[:, None]


@dataclass
class CheckedInputs:
    """Both sides after the checks: float32 embeddings, int64 labels, and the optional per-item arrays."""

    q_emb: torch.Tensor
    g_emb: torch.Tensor
    q_lab: np.ndarray
    g_lab: np.ndarray
    q_ids: Optional[np.ndarray] = None
    g_ids: Optional[np.ndarray] = None
    q_seq: Optional[np.ndarray] = None
    g_seq: Optional[np.ndarray] = None
    categories: Optional[np.ndarray] = None

    @property
    def n_q(self) -> int:
        return self.q_emb.shape[0]

    @property
    def n_g(self) -> int:
        return self.g_emb.shape[0]


def _paired(q_vals: Any, g_vals: Any, field: str, n_q: int, n_g: int) -> tuple[Optional[np.ndarray], ...]:
    """A per-item field that must be given on both sides or neither (ids, sequences), as two arrays or Nones."""
    q_name, g_name = f"query_{field}", f"gallery_{field}"
    if (q_vals is None) != (g_vals is None):
        given, missing = (q_name, g_name) if q_vals is not None else (g_name, q_name)
        raise ValueError(f"{given} was given without {missing}; pass both (or neither)")
    if q_vals is None:
        return None, None
    return to_numpy_1d(q_vals, q_name, n_q, "query"), to_numpy_1d(g_vals, g_name, n_g, "gallery")


def check_inputs(query: RetrievalSide, gallery: RetrievalSide) -> CheckedInputs:
    """Both sides checked and converted; every error names the argument (``<side>_<field>``)."""
    q_emb = as_embeddings(query.embeddings, "query_embeddings")
    g_emb = as_embeddings(gallery.embeddings, "gallery_embeddings")
    n_q, n_g = q_emb.shape[0], g_emb.shape[0]
    if q_emb.shape[1] != g_emb.shape[1]:
        raise ValueError(
            f"query_embeddings has dim {q_emb.shape[1]} but gallery_embeddings has dim {g_emb.shape[1]}; "
            "both must come from the same model"
        )
    q_lab = as_labels(query.labels, "query_labels", n_q, "query")
    g_lab = as_labels(gallery.labels, "gallery_labels", n_g, "gallery")
    q_ids, g_ids = _paired(query.ids, gallery.ids, "ids", n_q, n_g)
    q_seq, g_seq = _paired(query.sequences, gallery.sequences, "sequences", n_q, n_g)
    if gallery.categories is not None:
        raise ValueError("gallery_categories are not used: metrics are split by the query's category; "
                         "give categories to the query side only")
    categories = None
    if query.categories is not None:
        categories = to_numpy_1d(query.categories, "query_categories", n_q, "query")
        if pd.isna(pd.Series(categories, dtype=object)).any():
            raise ValueError("query_categories has missing values (None/NaN); give every query a category")
    return CheckedInputs(q_emb, g_emb, q_lab, g_lab, q_ids, g_ids, q_seq, g_seq, categories)


__all__ = ["CHUNK_ROWS", "CheckedInputs", "as_embeddings", "as_labels", "check_inputs", "joint_mean",
           "squared_norms", "to_numpy_1d", "unit_rows"]
