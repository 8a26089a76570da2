"""OML's principal-components fraction (pcf@v) over the query and gallery embeddings, each row counted once."""
from __future__ import annotations

import functools
import operator

import numpy as np
import pandas as pd
import torch
from oml.functional.metrics import calc_pcf

from metriclab.core.compat import oml_principal_axes
from metriclab.evaluation.inputs import CHUNK_ROWS, CheckedInputs


def pcf(sources: list[torch.Tensor], pcf_variance: tuple[float, ...]) -> list[float]:
    """OML's principal-components fraction of the rows of all sources together."""
    n = sum(len(s) for s in sources)
    dim = sources[0].shape[1]
    if n <= 2 * dim:
        return [float(v) for v in calc_pcf(torch.cat(sources), pcf_variance)]
    # OML's calc_pcf runs an SVD of the whole N×D matrix (3-4 s at Market size). The explained-variance ratios are the
    # covariance eigenvalues, so we get them from a chunked D×D covariance and let OML's PCA count the components.
    chunks = [s[a : a + CHUNK_ROWS] for s in sources for a in range(0, len(s), CHUNK_ROWS)]
    mean = (functools.reduce(operator.add, [c.sum(0).double() for c in chunks]) / n).float()
    # torch's matmul, not scipy's syrk: a second BLAS thread pool fights torch's for the 2 cores under load
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    for c in chunks:
        centred = c - mean
        gram += (centred.T @ centred).double()
    try:
        # numpy's LAPACK: torch's threaded eigvalsh took 1-6 s (not 20 ms) on the shared 2-core machine
        eigenvalues = np.linalg.eigvalsh(gram.numpy())
    except np.linalg.LinAlgError:  # calc_pcf's behaviour: a degenerate matrix gives NaN, not a crash
        return [float("nan")] * len(pcf_variance)
    variance = torch.from_numpy(eigenvalues).clamp(min=0).flip(0)  # descending
    # float32 ratios, as calc_pcf on float32 input
    n_components = oml_principal_axes((variance / variance.sum()).float(), pcf_variance)
    return [float(v) for v in n_components / dim]


def pcf_of_inputs(inputs: CheckedInputs, pcf_variance: tuple[float, ...]) -> list[float]:
    """pcf over the queries and the gallery; a query that is also a gallery item (same id) is counted once."""
    if not pcf_variance:
        return []
    sources = [inputs.g_emb]
    if inputs.q_ids is not None and inputs.g_ids is not None:
        q_only = ~pd.Series(inputs.q_ids, dtype=object).isin(set(inputs.g_ids.tolist())).to_numpy()
        sources.insert(0, inputs.q_emb[torch.from_numpy(q_only)])
    else:
        sources.insert(0, inputs.q_emb)
    return pcf([s for s in sources if len(s)], pcf_variance)


__all__ = ["pcf", "pcf_of_inputs"]
