"""Nearest-neighbour search over gallery embeddings with faiss, and an on-disk cache of embeddings + index.

Index kinds: ``flat`` (exact) and ``hnsw`` (approximate, graph based). Distances are returned in the units the
evaluation engine uses (``metriclab.evaluation.engine``): euclidean = the L2 distance (faiss returns its square),
cosine = 1 - cosine similarity (inner product of L2-normalised vectors).

Cache layout (one folder per gallery key; files written to a temporary name, then renamed)::

    <cache_dir>/<gallery key>/embeddings.npy      float32 [G, D]
    <cache_dir>/<gallery key>/gallery.csv         one row per embedding: path, label, class_name
    <cache_dir>/<gallery key>/meta.json           the key's parts and the sha256 of every file of the entry (written
                                                  last: no meta = incomplete entry)
    <cache_dir>/<gallery key>/index-<index key>.faiss

The gallery key hashes what determines the embeddings (checkpoint content, extractor config, gallery CSV or folder
listing and file stats, transforms); the index key adds the index config, so changing only the index reuses the
embeddings. A file whose sha256 differs from the one meta.json recorded (edited, swapped) is rebuilt, with a warning.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import faiss
import numpy as np
import pandas as pd

from metriclab.core.atomic import atomic_write, write_csv_atomic, write_json_atomic
from metriclab.core.constants import CLASS_NAME_COLUMN, DISTANCES
from metriclab.core.errors import ConfigError
from metriclab.core.progress import progress
from metriclab.core.schemas import IndexConfig

log = logging.getLogger(__name__)

INDEX_KINDS = ("flat", "hnsw")
#: Bump when the cache layout or the meaning of a key part changes: old entries are then ignored.
CACHE_FORMAT = 2  # 2: meta.json records the files' sha256
GALLERY_COLUMNS = ("path", "label", CLASS_NAME_COLUMN)


@dataclass(frozen=True)
class IndexSpec:
    """What a faiss index is: its kind, the distance, and the HNSW parameters (ignored by `flat`)."""

    kind: str = "flat"
    distance: str = "euclidean"
    m: int = 32  # HNSW: graph neighbours per node
    ef_construction: int = 200  # HNSW: candidate list while building (recall of the graph)
    ef_search: int = 128  # HNSW: candidate list per query (recall vs speed); raised to k when smaller

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ConfigError(f"`index.kind={self.kind}` is not supported; choose one of {INDEX_KINDS}")
        if self.distance not in DISTANCES:
            raise ConfigError(f"`distance={self.distance}` is not supported; choose one of {DISTANCES}")
        for name in ("m", "ef_construction", "ef_search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"`index.{name}` must be a positive integer, got {value!r}")

    @classmethod
    def from_config(cls, index: IndexConfig, distance: str = "euclidean") -> "IndexSpec":
        """From the built `index` group (`metriclab.core.config.build(cfg.index, "index")`, which rejects unknown
        keys and wrong types) and the job's distance; the values are checked here."""
        return cls(kind=index.kind, distance=distance, m=index.m, ef_construction=index.ef_construction,
                   ef_search=index.ef_search)

    def key_parts(self) -> Dict[str, Any]:
        """The fields that change the index (HNSW parameters mean nothing to a flat index)."""
        parts = asdict(self)
        if self.kind == "flat":
            for name in ("m", "ef_construction", "ef_search"):
                parts.pop(name)
        else:
            parts.pop("ef_search")  # a search-time setting: the stored graph does not depend on it
        return parts

    def describe(self) -> str:
        if self.kind == "flat":
            return f"flat (exact, {self.distance})"
        return f"hnsw (M={self.m}, efConstruction={self.ef_construction}, efSearch={self.ef_search}, {self.distance})"


def _as_float32_rows(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n, dim], got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        bad = np.flatnonzero(~np.isfinite(arr).all(axis=1))[:5].tolist()
        raise ValueError(f"{name} has NaN/inf values in rows {bad}: check the checkpoint")
    return arr


def _prepare(x: np.ndarray, spec: IndexSpec, name: str) -> np.ndarray:
    arr = _as_float32_rows(x, name)
    if spec.distance == "cosine":
        norms = np.linalg.norm(arr, axis=1)
        if (norms == 0).any():
            raise ValueError(f"{name} rows {np.flatnonzero(norms == 0)[:5].tolist()} have zero norm: cosine "
                             f"distance is undefined for them")
        arr = arr / norms[:, None]
    return arr


def build_index(embeddings: np.ndarray, spec: IndexSpec) -> faiss.Index:
    """A faiss index over the gallery embeddings (row i of `embeddings` = id i)."""
    data = _prepare(embeddings, spec, "gallery embeddings")
    dim = data.shape[1]
    metric = faiss.METRIC_INNER_PRODUCT if spec.distance == "cosine" else faiss.METRIC_L2
    index: Any  # faiss's SWIG classes: IndexFlat or IndexHNSWFlat
    if spec.kind == "flat":
        index = faiss.IndexFlat(dim, metric)
    else:
        index = faiss.IndexHNSWFlat(dim, int(spec.m), metric)
        index.hnsw.efConstruction = int(spec.ef_construction)
    step = 16384  # rows per add: an HNSW build of a large gallery takes minutes, the bar shows it moving
    for start in progress(range(0, len(data), step), f"building the {spec.kind} index", -(-len(data) // step),
                          "chunk"):
        index.add(data[start : start + step])
    return index


def search(index: faiss.Index, spec: IndexSpec, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k (distances [Q, k] float32, ids [Q, k] int64), nearest first; missing results are -1 / inf."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"`k` must be a positive integer, got {k!r}")
    if k > index.ntotal:
        raise ConfigError(f"k={k} but the gallery has only {index.ntotal} image(s): lower `k`")
    q = _prepare(queries, spec, "query embeddings")
    if q.shape[1] != index.d:
        raise ValueError(f"query embeddings have {q.shape[1]} dimensions, the index {index.d}: same model?")
    if spec.kind == "hnsw":
        # efSearch below k makes HNSW return fewer than k results
        hnsw: Any = index  # an IndexHNSWFlat (spec.kind says so); faiss's stubs know only the base class
        hnsw.hnsw.efSearch = max(int(spec.ef_search), int(k))
    raw, ids = index.search(q, int(k))
    ids = ids.astype(np.int64)
    if spec.distance == "cosine":
        dist = 1.0 - raw
    else:
        dist = np.sqrt(np.maximum(raw, 0.0))
    dist = np.where(ids >= 0, dist, np.inf).astype(np.float32)
    return dist, ids


# ----------------------------------------------------------------------------------------------------------------------
# hashing and the cache


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(paths) -> str:
    """Hash of (path, size, mtime) of every file: replacing or editing an image changes it, reading does not."""
    digest = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def key_of(parts: Dict[str, Any]) -> str:
    text = json.dumps({"cache_format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class GalleryIndex:
    """Gallery embeddings, what each row is, the faiss index, and where they came from."""

    embeddings: np.ndarray
    table: pd.DataFrame  # GALLERY_COLUMNS, row i = index id i
    index: faiss.Index
    spec: IndexSpec
    cache_dir: Optional[Path]
    embeddings_from_cache: bool
    index_from_cache: bool

    def search(self, queries: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        return search(self.index, self.spec, queries, k)


def _check_table(table: pd.DataFrame, n: int) -> pd.DataFrame:
    missing = [c for c in GALLERY_COLUMNS if c not in table.columns]
    if missing:
        raise ValueError(f"the gallery table lacks column(s) {missing}; it needs {list(GALLERY_COLUMNS)}")
    if len(table) != n:
        raise ValueError(f"the gallery table has {len(table)} rows but there are {n} embeddings")
    return table[list(GALLERY_COLUMNS)].reset_index(drop=True)


def _load_entry(entry: Path, gallery_key: str) -> Optional[Tuple[np.ndarray, pd.DataFrame]]:
    meta_path = entry / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("gallery_key") != gallery_key:
            return None
        embeddings = np.load(entry / "embeddings.npy", allow_pickle=False)
        table = pd.read_csv(entry / "gallery.csv", keep_default_na=False, dtype={"path": str, "class_name": str})
        table = _check_table(table, len(embeddings))
        digests = meta.get("sha256") or {}
        for name in ("embeddings.npy", "gallery.csv"):
            if digests.get(name) != file_sha256(entry / name):
                log.warning("cache file %s does not match the sha256 recorded in %s (edited or replaced): "
                            "rebuilding the entry", entry / name, meta_path)
                return None
        return embeddings, table
    except Exception as e:  # a damaged entry is rebuilt, never trusted
        log.warning("cache entry %s is unreadable (%s: %s): rebuilding it", entry, type(e).__name__, e)
        return None


def _record_digest(path: Path) -> None:
    """Add `path`'s sha256 to its entry's meta.json (an index is added to an entry after the entry is written)."""
    meta_path = path.parent / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("sha256", {})[path.name] = file_sha256(path)
    write_json_atomic(meta_path, meta)


def _load_index(index_path: Path, embeddings: np.ndarray) -> Optional[faiss.Index]:
    """The cached index when its file is the one recorded in meta.json and fits the embeddings, else None."""
    if not index_path.is_file():
        return None
    try:
        recorded = (json.loads((index_path.parent / "meta.json").read_text()).get("sha256") or {})
        if recorded.get(index_path.name) != file_sha256(index_path):
            log.warning("cached index %s does not match the sha256 recorded in %s (edited or replaced): "
                        "rebuilding it", index_path, index_path.parent / "meta.json")
            return None
        index = faiss.read_index(str(index_path))
        if index.ntotal != len(embeddings) or index.d != embeddings.shape[1]:
            raise ValueError(f"index holds {index.ntotal} x {index.d}, embeddings are {embeddings.shape}")
        return index
    except Exception as e:  # rebuilt by the caller
        log.warning("cached index %s is unusable (%s): rebuilding it", index_path, e)
        return None


def load_or_build_gallery(
    compute: Callable[[], Tuple[np.ndarray, pd.DataFrame]],
    key_parts: Dict[str, Any],
    spec: IndexSpec,
    cache_dir: Optional[Path] = None,
) -> GalleryIndex:
    """Embeddings + index for a gallery: loaded from `cache_dir` when the key matches, else built and stored.

    `compute()` returns (embeddings [G, D], table with GALLERY_COLUMNS); it is called only on a cache miss.
    `cache_dir=None` disables the cache.
    """
    gallery_key = key_of(key_parts)
    entry = Path(cache_dir) / gallery_key if cache_dir is not None else None
    loaded = _load_entry(entry, gallery_key) if entry is not None else None
    if loaded is not None:
        embeddings, table = loaded
        log.info("gallery embeddings loaded from cache %s", entry)
    else:
        embeddings, table = compute()
        embeddings = _as_float32_rows(embeddings, "gallery embeddings")
        table = _check_table(pd.DataFrame(table), len(embeddings))
        if entry is not None:
            # meta.json last: an interrupted write leaves no meta, so the entry is rebuilt next time
            atomic_write(entry / "embeddings.npy", lambda p: np.save(p, embeddings), ".npy")
            write_csv_atomic(table, entry / "gallery.csv")
            digests = {name: file_sha256(entry / name) for name in ("embeddings.npy", "gallery.csv")}
            write_json_atomic(entry / "meta.json", {"gallery_key": gallery_key, "parts": key_parts,
                                                    "n": int(len(embeddings)), "dim": int(embeddings.shape[1]),
                                                    "sha256": digests})

    index_path = entry / f"index-{key_of(spec.key_parts())}.faiss" if entry is not None else None
    index = _load_index(index_path, embeddings) if loaded is not None and index_path is not None else None
    index_from_cache = index is not None
    if index is None:
        index = build_index(embeddings, spec)
        if index_path is not None:
            atomic_write(index_path, lambda p: faiss.write_index(index, p), ".faiss")
            _record_digest(index_path)
    return GalleryIndex(embeddings, table, index, spec, entry, loaded is not None, index_from_cache)


__all__ = ["GALLERY_COLUMNS", "GalleryIndex", "INDEX_KINDS", "IndexSpec", "build_index", "file_sha256",
           "files_fingerprint", "key_of", "load_or_build_gallery", "search"]
