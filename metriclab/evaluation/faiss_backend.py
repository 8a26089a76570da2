"""The faiss backends: ``faiss-flat`` (exact search) and ``faiss-hnsw`` (approximate) give the top-k metrics only.

Each query is searched deeper by its number of excluded pairs, so after dropping them the list is still as deep
as the metrics need. Ties keep faiss' order; ``first_hit_rank`` is 0 when the first true match lies deeper than
the searched list; mAP / mINP need the whole ranking and are not computed. (Named so it cannot shadow `faiss`.)
"""
from __future__ import annotations

from typing import Any

import numpy as np

from metriclab.evaluation.blocks import Pairs
from metriclab.evaluation.inputs import CheckedInputs, unit_rows
from metriclab.evaluation.report import QueryState
from metriclab.evaluation.spec import RetrievalSpec


def _import_faiss(backend: str) -> Any:
    try:
        import faiss  # optional dependency: only needed for these backends
    except ImportError as e:
        raise ImportError(
            f"backend={backend!r} needs faiss (pip install faiss-cpu); use backend='exact' without it"
        ) from e
    return faiss


def _build_index(faiss: Any, g_np: np.ndarray, metric: int, spec: RetrievalSpec) -> tuple[Any, str]:
    """The gallery index and the backend's name for the report (HNSW states its parameters: it is approximate)."""
    dim = g_np.shape[1]
    if spec.backend == "faiss-flat":
        index = faiss.IndexFlatIP(dim) if metric == faiss.METRIC_INNER_PRODUCT else faiss.IndexFlatL2(dim)
        name = "faiss-flat"
    else:
        index = faiss.IndexHNSWFlat(dim, int(spec.hnsw_m), metric)
        index.hnsw.efConstruction = int(spec.hnsw_ef_construction)
        name = (
            f"faiss-hnsw (approximate: M={spec.hnsw_m}, efConstruction={spec.hnsw_ef_construction}, "
            f"efSearch>={spec.hnsw_ef_search}; top-k lists may miss true neighbours, mAP/mINP not computed)"
        )
    index.add(np.ascontiguousarray(g_np))
    return index, name


def _search_block(index: Any, q_block: np.ndarray, excluded: np.ndarray, n_g: int, search: int, depth: int,
                  inner_product: bool) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, depth] of the nearest non-excluded gallery items (-1 = none) and their distances (inf = none)."""
    n_rows = q_block.shape[0]
    raw_d, raw_i = index.search(np.ascontiguousarray(q_block), search)
    raw_i = raw_i.astype(np.int64)
    keep = raw_i >= 0
    codes = np.arange(n_rows, dtype=np.int64)[:, None] * n_g + np.maximum(raw_i, 0)
    keep &= ~np.isin(codes, excluded)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :depth]  # kept items first, faiss order preserved
    ids = np.take_along_axis(raw_i, order, 1)
    kept = np.take_along_axis(keep, order, 1)
    raw = np.take_along_axis(raw_d, order, 1)
    dists = (1.0 - raw) if inner_product else np.sqrt(np.maximum(raw, 0.0))
    ids = np.where(kept, ids, -1)
    dists = np.where(kept, dists, np.inf).astype(np.float32)
    if ids.shape[1] < depth:  # gallery smaller than the depth
        pad = depth - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        dists = np.pad(dists, ((0, 0), (0, pad)), constant_values=np.inf)
    return ids, dists


def run_faiss(inputs: CheckedInputs, pairs: Pairs, blocks: list[tuple[int, int]], spec: RetrievalSpec,
              state: QueryState) -> str:
    """Top-`spec.search_depth` search per query, filling `state`; returns the backend's name for the report."""
    faiss = _import_faiss(spec.backend)
    n_g, depth = inputs.n_g, spec.search_depth
    inner_product = spec.distance == "cosine"
    if inner_product:
        q_np = unit_rows(inputs.q_emb, "query_embeddings").numpy()
        g_np = unit_rows(inputs.g_emb, "gallery_embeddings").numpy()
    else:
        q_np, g_np = inputs.q_emb.numpy(), inputs.g_emb.numpy()
    index, name = _build_index(faiss, g_np, faiss.METRIC_INNER_PRODUCT if inner_product else faiss.METRIC_L2, spec)
    q_lab, g_lab = inputs.q_lab, inputs.g_lab

    for lo, hi in blocks:
        excluded = pairs.excluded(lo, hi, n_g)
        search = int(min(n_g, depth + int(pairs.excluded_counts[lo:hi].max(initial=0))))
        if spec.backend == "faiss-hnsw":
            index.hnsw.efSearch = max(int(spec.hnsw_ef_search), search)
        ids, dists = _search_block(index, q_np[lo:hi], excluded, n_g, search, depth, inner_product)

        pos_codes = pairs.positives.flat_pairs(lo, hi, n_g)
        pos_codes = pos_codes[~np.isin(pos_codes, excluded)]
        state.n_true[lo:hi] = np.bincount(pos_codes // n_g, minlength=hi - lo)
        is_true = (ids >= 0) & (g_lab[np.maximum(ids, 0)] == q_lab[lo:hi, None])
        rows, cols = np.nonzero(is_true)
        k = np.cumsum(is_true, axis=1)[rows, cols] - 1
        state.add_ranks(lo, hi, rows, k, cols + 1, complete=False)
        state.add_topk(lo, hi, ids, dists, q_lab, g_lab)
    return name


__all__ = ["run_faiss"]
