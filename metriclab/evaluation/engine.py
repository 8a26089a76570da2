"""Exact retrieval and re-ID metrics for query vs gallery embeddings, computed in query blocks.

Why our own engine: OML's full-gallery mAP (the number re-ID papers report) builds the whole Q×G distance matrix
and keeps G retrieved items per query (+2 GB, 30-70 s on Market under load) and it averages in queries that have no
valid true match; torchreid's evaluation is slow Python. Here every block of queries gets its distances from one
matrix product, ranks are computed inside the block, and only per-query numbers are kept.

Definitions (all exact; ``rank`` is 1-based, in the ranking of the non-excluded gallery items of a query):

- excluded pairs: the same dataset row (``query.ids[i] == gallery.ids[j]``) and the same sequence
  (``query.sequences[i] == gallery.sequences[j]``, e.g. Market ``"<pid>_c<cam>"``). Excluded items are neither true
  matches nor negatives and never appear in ``topk_ids``. A missing sequence (None/NaN) belongs to no sequence
  (OML puts all missing values into ONE sequence; we do not).
- true match: a non-excluded gallery item with the query's label; ``n_true`` counts them. A query with ``n_true == 0``
  is invalid: skipped from every average and counted in ``n_queries_skipped`` (torchreid / re-ID convention).
- ties in distance are ranked pessimistically: within a group of equal distances the wrong items come before the true
  matches (a collapsed model that maps everything to one point gets the worst score, not an index-order lottery);
  among items of the same kind the lower gallery index comes first (visible only in ``topk_ids``).
- ``cmc@k``: the first true match has rank <= k.
- ``mAP``: mean over valid queries of AP = (1/n_true) * sum_i i / rank_i over ALL true matches (re-ID mAP).
- ``mINP``: mean over valid queries of n_true / rank of the hardest (last) true match (as in torchreid / fast-reid).
- ``map@r`` / ``r_precision`` (pytorch-metric-learning): with R = n_true, (1/R) * sum_{i: rank_i <= R} i / rank_i and
  (true matches within the first R) / R.
- ``map@k`` (OML): (1/h_k) * sum_{i: rank_i <= k} i / rank_i with h_k = true matches within the top k; 0 when h_k = 0.
- ``precision@k`` (OML): h_k / min(k, n_true).
- ``knn_accuracy@k``: the majority label of the k nearest non-excluded gallery items (in the ranking above, so a
  tie at the k-th place lets the wrong items in first) equals the query label; a tie in votes between labels goes to
  the label that occurs nearest to the query.
- ``pcf@v``: OML's principal-components fraction over the query + gallery embeddings (a row that is both query and
  gallery, by id, is counted once).

Numerics: embeddings are used as float32 on CPU, and the ranking is the exact order of their distances. Euclidean
ranks by ``|g|^2 - 2 q.g`` of centred copies (the row constant ``|q|^2`` cannot change a ranking); cosine by
``1 - q.g`` of unit-normalised copies. Where those float32 keys are too close to tell two items apart (within their
rounding bound), the items are ordered by distances recomputed in float64; ``topk_distances`` are the float64 ones.

Post-processing (``spec.postprocess``, `metriclab.evaluation.postprocess`): expansion steps replace the embeddings
before ranking; k-reciprocal re-ranking replaces the distances the exact backend ranks by (exclusions apply as
usual); pcf is always of the embeddings as given.

Backends: ``"exact"`` (default) gives everything. ``"faiss-flat"`` (exact search) and ``"faiss-hnsw"``
(approximate) give only the top-k metrics (cmc, map@k, precision@k, knn accuracy); ``mAP``/``mINP`` are left out of
``metrics`` and ``ap``/``inp`` are NaN, because they need the whole ranking. With faiss, ties keep faiss' order and
``first_hit_rank`` is 0 when the first true match lies deeper than the searched list.

Parts: `spec` (what to compute: `RetrievalSpec`; the items of a side: `RetrievalSide`), `inputs` (checks),
`blocks` (true-match and excluded pairs, the block plan), `exact` and `faiss_backend` (the backends), `ranking`
(the tie rule, kNN votes), `pcf`, `report` (per-query numbers, their means, `RetrievalReport`). This module only
puts them in order.
"""

from __future__ import annotations

from dataclasses import replace

from metriclab.evaluation.blocks import Pairs, plan_blocks
from metriclab.evaluation.exact import run_exact
from metriclab.evaluation.faiss_backend import run_faiss
from metriclab.evaluation.inputs import check_inputs
from metriclab.evaluation.pcf import pcf_of_inputs
from metriclab.evaluation.postprocess import RerankedKeys, apply_steps
from metriclab.evaluation.report import PER_QUERY_COLUMNS, QueryState, RetrievalReport, build_report, warn_skipped
from metriclab.evaluation.spec import RetrievalSide, RetrievalSpec

#: every metric with its default k, euclidean, exact, 10 neighbours kept
DEFAULT_SPEC = RetrievalSpec()


def evaluate_retrieval(
    query: RetrievalSide, gallery: RetrievalSide, spec: RetrievalSpec = DEFAULT_SPEC
) -> RetrievalReport:
    """Retrieval / re-ID metrics of the `query` items against the `gallery` items, as `spec` asks; see the module
    docstring for the definitions. Work is done in blocks of queries, so memory stays bounded as the gallery grows.
    """
    for name, value, kind in (("query", query, RetrievalSide), ("gallery", gallery, RetrievalSide),
                              ("spec", spec, RetrievalSpec)):
        if not isinstance(value, kind):
            raise TypeError(f"evaluate_retrieval: {name} must be a {kind.__name__}, got {type(value).__name__}")
    inputs = check_inputs(query, gallery)
    pairs = Pairs.of(inputs)
    blocks = plan_blocks(inputs.n_q, inputs.n_g, spec.block_size, pairs.positives.query_counts + pairs.excluded_counts)
    state = QueryState(inputs.n_q, spec)
    ranked, keys = inputs, None
    if spec.postprocess:
        q_emb, g_emb, reranker = apply_steps(spec.postprocess, inputs.q_emb, inputs.g_emb, spec.distance == "cosine")
        ranked = replace(inputs, q_emb=q_emb, g_emb=g_emb)
        keys = None if reranker is None else RerankedKeys(reranker, inputs.n_q)
    if spec.exact:
        backend_name = run_exact(ranked, pairs, blocks, spec, state, keys)
    else:
        backend_name = run_faiss(ranked, pairs, blocks, spec, state)
    # pcf describes the embeddings themselves, not a ranking: from the inputs as given
    report = build_report(state, spec, pcf_of_inputs(inputs, spec.pcf_variance), backend_name, inputs.categories)
    warn_skipped(report.per_query["valid"].to_numpy(), stacklevel=2)  # points at our caller
    return report


__all__ = [
    "DEFAULT_SPEC", "PER_QUERY_COLUMNS", "RetrievalReport", "RetrievalSide", "RetrievalSpec", "evaluate_retrieval",
]
