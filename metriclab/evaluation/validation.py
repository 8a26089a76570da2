"""Validation metrics: the validation rows split into queries and gallery, and the metric engine run over them."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import numpy as np
import torch

from metriclab.data.datasets import ValidationData
from metriclab.evaluation.engine import evaluate_retrieval
from metriclab.evaluation.postprocess import PostprocessStep
from metriclab.evaluation.report import PLAIN_PREFIX, RetrievalReport
from metriclab.evaluation.spec import EvaluationConfigLike, RetrievalSide, RetrievalSpec, as_evaluation_config
from metriclab.evaluation.verification import verification_metrics


def evaluate_validation(embeddings: torch.Tensor, data: ValidationData, cfg: EvaluationConfigLike,
                        postprocess: Sequence[PostprocessStep] = (),
                        target_fmr: Optional[float] = None) -> RetrievalReport:
    """Metrics for validation embeddings in dataset row order. `cfg`: the `evaluation` group, built
    (`EvaluationConfig`) or as its config node (a DictConfig or dict, built here: an unknown key is an error).

    A row is a query, a gallery item or both; its dataset row number is its id on both sides, so a row is never
    compared with itself, and rows of one `sequence` are never compared with each other.

    `postprocess` (a chain of steps, `metriclab.evaluation.postprocess`): the report is the post-processed
    ranking's, its metrics under the usual keys, and the plain ranking's metrics beside them as `plain/<metric>`
    (pcf describes the embeddings, not a ranking: it is not repeated).

    With `cfg.verification` (default on): FNMR@FMR for `cfg.fmr_vals` (and `target_fmr`, the calibration's
    operating point, when given), their thresholds and the EER over the same valid pairs
    (`metriclab.evaluation.verification`; of the embeddings, before any post-processing), in the metrics and as
    `report.verification`."""
    built = as_evaluation_config(cfg)
    spec = RetrievalSpec.from_config(built, postprocess=tuple(postprocess))
    q = np.flatnonzero(data.is_query)
    g = np.flatnonzero(data.is_gallery)
    emb = embeddings.float()
    seq = data.sequences
    cats = data.categories
    query = RetrievalSide(emb[q], data.labels[q], ids=q, sequences=None if seq is None else seq[q],
                          categories=None if cats is None else cats[q])
    gallery = RetrievalSide(emb[g], data.labels[g], ids=g, sequences=None if seq is None else seq[g])
    report = evaluate_retrieval(query, gallery, spec)
    if spec.postprocess:
        plain = evaluate_retrieval(query, gallery, replace(spec, postprocess=(), pcf_variance=()))
        report.metrics.update({PLAIN_PREFIX + k: v for k, v in plain.metrics.items()})
    if built.verification:
        fmr_vals = sorted({*map(float, built.fmr_vals), *([float(target_fmr)] if target_fmr is not None else [])},
                          reverse=True)
        report.verification = verification_metrics(query, gallery, spec.distance, fmr_vals)
        report.metrics.update(report.verification.metrics)
    return report


__all__ = ["evaluate_validation"]
