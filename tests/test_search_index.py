"""faiss search against a naive numpy reference, HNSW recall against flat, and the on-disk gallery cache."""
from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from metriclab.core.config import build
from metriclab.core.errors import ConfigError
from metriclab.core.schemas import IndexConfig
from metriclab.inference.search_index import IndexSpec, build_index, key_of, load_or_build_gallery, search

faiss.omp_set_num_threads(1)  # 2 shared cores; a single-threaded HNSW build is also reproducible


def clustered(n: int, dim: int, n_clusters: int, seed: int) -> np.ndarray:
    """Embedding-like data: points around cluster centres (pure noise in high dimension has no neighbours)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim)).astype(np.float32)
    return centres[rng.integers(0, n_clusters, n)] + 0.3 * rng.normal(size=(n, dim)).astype(np.float32)


def naive_topk(queries: np.ndarray, gallery: np.ndarray, k: int, distance: str):
    if distance == "cosine":
        qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
        gn = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
        d = 1.0 - qn.astype(np.float64) @ gn.T.astype(np.float64)
    else:
        d = np.sqrt(((queries[:, None, :].astype(np.float64) - gallery[None].astype(np.float64)) ** 2).sum(-1))
    ids = np.argsort(d, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(d, ids, 1), ids


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_flat_equals_naive_reference(distance):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(300, 16)).astype(np.float32)
    queries = rng.normal(size=(25, 16)).astype(np.float32)
    spec = IndexSpec(kind="flat", distance=distance)
    dist, ids = search(build_index(gallery, spec), spec, queries, 7)
    ref_d, ref_ids = naive_topk(queries, gallery, 7, distance)
    assert dist.shape == ids.shape == (25, 7) and dist.dtype == np.float32 and ids.dtype == np.int64
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(dist, ref_d, atol=2e-4)
    assert (np.diff(dist, axis=1) >= 0).all()


def test_flat_hand_computed_distances():
    gallery = np.array([[0, 0], [3, 4], [1, 0]], dtype=np.float32)
    spec = IndexSpec(kind="flat", distance="euclidean")
    dist, ids = search(build_index(gallery, spec), spec, np.array([[0, 0]], dtype=np.float32), 3)
    assert ids.tolist() == [[0, 2, 1]]
    np.testing.assert_allclose(dist, [[0.0, 1.0, 5.0]], atol=1e-6)
    cos = IndexSpec(kind="flat", distance="cosine")
    dist, ids = search(build_index(gallery[1:], cos), cos, np.array([[1, 0]], dtype=np.float32), 2)
    assert ids.tolist() == [[1, 0]]  # [1, 0] (cos 1) before [3, 4] (cos 0.6)
    np.testing.assert_allclose(dist, [[0.0, 0.4]], atol=1e-6)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_hnsw_recall_against_flat(distance):
    gallery = clustered(3000, 32, 60, seed=1)
    queries = clustered(200, 32, 60, seed=2)
    flat = IndexSpec(kind="flat", distance=distance)
    hnsw = IndexSpec(kind="hnsw", distance=distance, m=16, ef_construction=100, ef_search=64)
    _, exact_ids = search(build_index(gallery, flat), flat, queries, 10)
    approx_d, approx_ids = search(build_index(gallery, hnsw), hnsw, queries, 10)
    recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx_ids, exact_ids)])
    assert recall >= 0.97, recall
    # whatever HNSW returns, its distances are the true distances of those items, sorted
    ref = naive_topk(queries, gallery, 3000, distance)
    true_d = np.empty_like(approx_d)
    for i, row in enumerate(approx_ids):
        lookup = dict(zip(ref[1][i], ref[0][i]))
        true_d[i] = [lookup[j] for j in row]
    np.testing.assert_allclose(approx_d, true_d, atol=2e-4)
    assert (np.diff(approx_d, axis=1) >= -1e-6).all()


def test_hnsw_returns_k_results_even_when_ef_search_is_smaller():
    gallery = clustered(500, 8, 10, seed=3)
    spec = IndexSpec(kind="hnsw", m=8, ef_construction=40, ef_search=1)
    _, ids = search(build_index(gallery, spec), spec, gallery[:5], 50)
    assert ids.shape == (5, 50) and (ids >= 0).all()
    assert all(len(set(row)) == 50 for row in ids)


def test_bad_specs_and_inputs_name_the_key():
    with pytest.raises(ConfigError, match="index.kind=ivf"):
        IndexSpec(kind="ivf")
    with pytest.raises(ConfigError, match="distance=manhattan"):
        IndexSpec(distance="manhattan")
    with pytest.raises(ConfigError, match="index.m"):
        IndexSpec(kind="hnsw", m=0)
    with pytest.raises(ConfigError, match=r"`index.efsearch` is not a key of `index`"):
        build(OmegaConf.create({"kind": "hnsw", "efsearch": 5}), "index")
    with pytest.raises(ConfigError, match="index.m"):  # the schema checks the type, IndexSpec the value
        IndexSpec.from_config(IndexConfig(kind="hnsw", m=-1))
    spec = IndexSpec.from_config(build(OmegaConf.create({"kind": "hnsw", "ef_search": 7}), "index"), "cosine")
    assert spec == IndexSpec(kind="hnsw", distance="cosine", m=32, ef_construction=200, ef_search=7)
    spec = IndexSpec()
    index = build_index(np.eye(3, dtype=np.float32), spec)
    with pytest.raises(ConfigError, match="k=4 but the gallery has only 3"):
        search(index, spec, np.eye(3, dtype=np.float32), 4)
    with pytest.raises(ConfigError, match="`k` must be a positive integer"):
        search(index, spec, np.eye(3, dtype=np.float32), 0)
    with pytest.raises(ValueError, match="rows \\[1\\] have zero norm"):
        build_index(np.array([[1, 0], [0, 0]], dtype=np.float32), IndexSpec(distance="cosine"))
    with pytest.raises(ValueError, match="NaN/inf values in rows \\[0\\]"):
        build_index(np.array([[np.nan, 0]], dtype=np.float32), spec)


def test_index_key_ignores_settings_that_do_not_change_it():
    assert key_of(IndexSpec(kind="flat", m=8).key_parts()) == key_of(IndexSpec(kind="flat", m=64).key_parts())
    hnsw = IndexSpec(kind="hnsw", m=16)
    assert key_of(hnsw.key_parts()) == key_of(IndexSpec(kind="hnsw", m=16, ef_search=500).key_parts())
    assert key_of(hnsw.key_parts()) != key_of(IndexSpec(kind="hnsw", m=32).key_parts())
    assert key_of(hnsw.key_parts()) != key_of(IndexSpec(kind="hnsw", m=16, distance="cosine").key_parts())


class CountingGallery:
    """compute() for load_or_build_gallery that counts how often the gallery is embedded."""

    def __init__(self, n: int = 40, dim: int = 8, seed: int = 0):
        self.embeddings = clustered(n, dim, 4, seed)
        self.table = pd.DataFrame({"path": [f"/g/{i}.png" for i in range(n)], "label": np.arange(n) % 4,
                                   "class_name": [f"c{i % 4}" for i in range(n)]})
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.embeddings, self.table


def test_cache_hit_miss_and_index_only_rebuild(tmp_path):
    gallery = CountingGallery()
    parts = {"checkpoint_sha256": "aaa", "gallery": {"csv_sha256": "bbb"}, "transforms": {"im_size": 32}}
    flat, hnsw = IndexSpec(kind="flat"), IndexSpec(kind="hnsw", m=8, ef_construction=40)

    first = load_or_build_gallery(gallery, parts, flat, tmp_path)
    assert gallery.calls == 1 and not first.embeddings_from_cache and not first.index_from_cache
    entry = first.cache_dir
    assert sorted(p.name for p in entry.iterdir() if not p.name.startswith(".")) == [
        "embeddings.npy", "gallery.csv", f"index-{key_of(flat.key_parts())}.faiss", "meta.json"]
    assert json.loads((entry / "meta.json").read_text())["n"] == 40

    second = load_or_build_gallery(gallery, parts, flat, tmp_path)  # unchanged: everything loaded
    assert gallery.calls == 1 and second.embeddings_from_cache and second.index_from_cache
    np.testing.assert_array_equal(second.embeddings, gallery.embeddings)
    pd.testing.assert_frame_equal(second.table, gallery.table, check_dtype=False)
    q = gallery.embeddings[:5] + 0.01
    np.testing.assert_array_equal(second.search(q, 6)[1], first.search(q, 6)[1])

    other_index = load_or_build_gallery(gallery, parts, hnsw, tmp_path)  # only the index config changed
    assert gallery.calls == 1 and other_index.embeddings_from_cache and not other_index.index_from_cache
    again = load_or_build_gallery(gallery, parts, hnsw, tmp_path)
    assert gallery.calls == 1 and again.index_from_cache
    np.testing.assert_array_equal(again.search(q, 6)[1], other_index.search(q, 6)[1])

    for changed in ({**parts, "checkpoint_sha256": "ccc"}, {**parts, "transforms": {"im_size": 64}},
                    {**parts, "gallery": {"csv_sha256": "ddd"}}):
        calls = gallery.calls
        rebuilt = load_or_build_gallery(gallery, changed, flat, tmp_path)
        assert gallery.calls == calls + 1 and not rebuilt.embeddings_from_cache and rebuilt.cache_dir != entry

    assert load_or_build_gallery(gallery, parts, flat, None).cache_dir is None  # cache disabled
    assert gallery.calls == 5


def test_damaged_or_incomplete_entries_are_rebuilt(tmp_path, caplog):
    gallery = CountingGallery()
    parts = {"checkpoint_sha256": "aaa"}
    entry = load_or_build_gallery(gallery, parts, IndexSpec(), tmp_path).cache_dir
    (entry / "embeddings.npy").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        rebuilt = load_or_build_gallery(gallery, parts, IndexSpec(), tmp_path)
    assert gallery.calls == 2 and not rebuilt.embeddings_from_cache
    assert "unreadable" in caplog.text and str(entry) in caplog.text
    (entry / "meta.json").unlink()  # an interrupted write never got to its meta.json
    load_or_build_gallery(gallery, parts, IndexSpec(), tmp_path)
    assert gallery.calls == 3
    index_file = next(entry.glob("index-*.faiss"))
    index_file.write_bytes(b"not an index")
    with caplog.at_level(logging.WARNING):
        fixed = load_or_build_gallery(gallery, parts, IndexSpec(), tmp_path)
    assert gallery.calls == 3 and fixed.embeddings_from_cache and not fixed.index_from_cache
    assert fixed.index.ntotal == 40


def test_compute_must_return_one_row_per_embedding(tmp_path):
    def bad():
        return np.zeros((3, 2), np.float32) + 1, pd.DataFrame({"path": ["a"], "label": [0], "class_name": ["x"]})

    with pytest.raises(ValueError, match="1 rows but there are 3 embeddings"):
        load_or_build_gallery(bad, {"x": 1}, IndexSpec(), tmp_path)
