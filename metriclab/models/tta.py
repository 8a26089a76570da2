"""Test-time augmentation: the embedding of an image as the mean of the image's and its horizontal flip's.

One function for every forward pass that embeds for evaluation (validate, predict, explain's gallery, the per-epoch
validation in training), so `evaluation.flip_tta=true` means the same everywhere.
"""
from __future__ import annotations

from typing import Callable

import torch

#: an extractor whose every output row has |norm - 1| below this normalises its embeddings, and so does the mean
UNIT_NORM_TOL = 1e-3


def normalises(embeddings: torch.Tensor) -> bool:
    """Whether every row has unit length (what an extractor with `normalise_features` returns)."""
    norms = torch.linalg.vector_norm(embeddings.float(), dim=1)
    return bool(len(norms)) and bool(((norms - 1.0).abs() < UNIT_NORM_TOL).all())


def extract_with_flip(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """(extract(images) + extract(images flipped left-right)) / 2 for a batch [B, C, H, W]; re-normalised to unit
    length when both passes give unit-length rows (the extractor normalises, so the result must too)."""
    plain = extract(images)
    flipped = extract(torch.flip(images, dims=[-1]))
    mean = (plain.float() + flipped.float()) / 2
    if normalises(plain) and normalises(flipped):
        mean = torch.nn.functional.normalize(mean, dim=1)
    return mean.to(plain.dtype)


def extract_maybe_flip(extract: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor,
                       flip_tta: bool) -> torch.Tensor:
    return extract_with_flip(extract, images) if flip_tta else extract(images)


__all__ = ["UNIT_NORM_TOL", "extract_maybe_flip", "extract_with_flip", "normalises"]
