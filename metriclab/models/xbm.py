"""Pair losses against a reference set, and the cross-batch memory (XBM) that supplies one: ``criterion=xbm``.

``PairLoss`` runs a pytorch-metric-learning pair-based loss (Multi-Similarity, Circle, SupCon, NT-Xent: the
subclasses in ``metriclab.models.losses``) on the batch's pairs, or on the pairs of the batch with a reference set.

``CrossBatchMemoryLoss`` (Wang et al. 2020, "Cross-Batch Memory for Embedding Learning") puts each batch's
embeddings (detached, fp32) and labels into a first-in-first-out memory of ``memory_size`` rows, and returns the
pair loss of the batch against the memory, which holds the batch itself (its self-pairs dropped): pytorch-metric-
learning's ``CrossBatchMemory`` rule, equal to it on the same calls. For the first ``warmup_iterations`` calls it
returns the plain batch loss and stores nothing: the paper starts the memory once the embeddings drift slowly.
A call is one iteration (a micro-batch under gradient accumulation).

Under DDP each process keeps its own memory of its own batches: nothing is gathered, ``memory_size`` is per
process, and the pairs a process sees are its batch against its memory (the gradients are then averaged as for
any loss). The memory is a plain tensor attribute, not a buffer, on purpose: DDP broadcasts buffers from rank 0
before each forward, which would replace every rank's memory with rank 0's; and it stays out of the checkpoint (a
cache, refilled within memory_size / batch size iterations). The iteration counter is a buffer, so a resumed run
does not warm up again.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Union

import torch
from pytorch_metric_learning.miners import BaseMiner
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu
from torch import Tensor, nn

TLabels = Union[Tensor, Sequence[int]]


class PairLoss(nn.Module):
    """A pair-based PML loss (``self.loss``) with an optional PML miner (``self.miner``), OML's call convention.

    ``forward(embeddings, labels, ref_emb=None, ref_labels=None, self_index=None)``: the loss of the batch's pairs
    with the reference set (the batch itself by default): the miner's pairs (a triplet miner's as pairs), or all.
    ``self_index[i]`` is row i's own row in ``ref_emb`` when the batch is part of it (cross-batch memory): that pair
    is dropped. fp32 with autocast off (exp(beta * cosine) overflows half precision). ``last_logs``: the number of
    positive and negative pairs used.
    """

    criterion_name = "pair"

    def __init__(self, loss: nn.Module, miner: Optional[BaseMiner] = None):
        super().__init__()
        if miner is not None and not isinstance(miner, BaseMiner):
            raise TypeError(f"`miner` must be a pytorch_metric_learning miner, got {type(miner).__name__}")
        self.loss: Any = loss  # a PML loss: (embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.miner: Any = miner
        self._last_logs: Dict[str, float] = {}

    def forward(self, embeddings: Tensor, labels: TLabels, ref_emb: Optional[Tensor] = None,
                ref_labels: Optional[Tensor] = None, self_index: Optional[Tensor] = None) -> Tensor:
        labels = torch.as_tensor(labels, device=embeddings.device).long().view(-1)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.float()
            ref_emb = None if ref_emb is None else ref_emb.float()
            mined = None if self.miner is None else self.miner(embeddings, labels, ref_emb, ref_labels)
            a1, p, a2, n = lmu.convert_to_pairs(mined, labels, ref_labels)  # None: all pairs
            if self_index is not None:  # a negative pair is never a self-pair: same row, same label
                keep = p != self_index[a1]
                a1, p = a1[keep], p[keep]
            loss = self.loss(embeddings, labels, (a1, p, a2, n), ref_emb, ref_labels)
        self._last_logs = {"pos_pairs": float(len(a1)), "neg_pairs": float(len(a2))}
        return loss

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


class CrossBatchMemoryLoss(nn.Module):
    """``loss`` (a ``PairLoss``, built by Hydra with its miner) of each batch against a memory of past batches.

    ``memory_size`` rows (>= the batch size), ``warmup_iterations`` plain calls before the memory starts. The
    miner, if any, mines the batch against the memory (PML's rule). ``last_logs``: the inner loss's, plus
    ``memory_rows`` (rows the batch was compared with, 0 during the warm-up).
    """

    criterion_name = "xbm"
    iteration: Tensor

    def __init__(self, loss: nn.Module, embedding_size: int, memory_size: int = 1024, warmup_iterations: int = 0):
        super().__init__()
        if not isinstance(loss, PairLoss):
            raise TypeError(f"criterion.loss must be a pair loss (multi_similarity, circle, supcon, ntxent), got "
                            f"{type(loss).__name__}: a proxy or classification loss compares the batch with its "
                            f"weights, not with other embeddings")
        if int(memory_size) < 1 or int(warmup_iterations) < 0:
            raise ValueError(f"memory_size must be >= 1 and warmup_iterations >= 0, got {memory_size} and "
                             f"{warmup_iterations}")
        self.loss = loss
        self.embedding_size = int(embedding_size)
        self.memory_size = int(memory_size)
        self.warmup_iterations = int(warmup_iterations)
        self.register_buffer("iteration", torch.zeros((), dtype=torch.long))  # calls so far, checkpointed
        self.reset_memory()
        self._last_logs: Dict[str, float] = {}

    def reset_memory(self) -> None:
        """Empty the memory (plain attributes, see the module docstring)."""
        self.memory = torch.zeros(self.memory_size, self.embedding_size)
        self.memory_labels = torch.zeros(self.memory_size, dtype=torch.long)
        self.n_filled = 0  # rows 0..n_filled-1 hold embeddings
        self.next_row = 0  # where the next batch starts (first in, first out)

    def enqueue(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Store the batch (detached, fp32) over the oldest rows; returns the rows it went to."""
        n = len(embeddings)
        if n > self.memory_size:
            raise ValueError(f"a batch of {n} does not fit criterion.memory_size={self.memory_size}: raise it")
        if self.memory.device != embeddings.device:
            self.memory = self.memory.to(embeddings.device)
            self.memory_labels = self.memory_labels.to(embeddings.device)
        rows = (self.next_row + torch.arange(n, device=embeddings.device)) % self.memory_size
        self.memory[rows] = embeddings.detach().float()
        self.memory_labels[rows] = labels
        self.next_row = (self.next_row + n) % self.memory_size
        self.n_filled = min(self.memory_size, self.n_filled + n)
        return rows

    def forward(self, embeddings: Tensor, labels: TLabels) -> Tensor:
        labels = torch.as_tensor(labels, device=embeddings.device).long().view(-1)
        self.iteration += 1
        if int(self.iteration) <= self.warmup_iterations:
            loss = self.loss(embeddings, labels)
            self._last_logs = {**self.loss.last_logs, "memory_rows": 0.0}
            return loss
        rows = self.enqueue(embeddings, labels)
        loss = self.loss(embeddings, labels, self.memory[: self.n_filled], self.memory_labels[: self.n_filled],
                         self_index=rows)
        self._last_logs = {**self.loss.last_logs, "memory_rows": float(self.n_filled)}
        return loss

    @property
    def last_logs(self) -> Dict[str, float]:
        return self._last_logs


__all__ = ["PairLoss", "CrossBatchMemoryLoss"]
