"""`extractor=timm extractor.arch=<timm model name>`: any timm backbone as a metric-learning extractor.

The backbone is `timm.create_model(arch, num_classes=0)` (its classifier removed), then optionally a linear
projection to `embedding_size`, a BNNeck (BatchNorm1d, bias frozen, as in the re-ID "bag of tricks") and L2
normalisation. `weights`: None = random init; "hub" = timm's pretrained weights for `arch` (downloaded, so only
when the machine is online); a local file is loaded by `metriclab.models.extractors.build_extractor`, weights-only
(this class then gets `weights=None`). `feat_dim` is the embedding size, as on OML's extractors; the backbone is
`.model`, so freezing names such as `layer4` resolve to `model.layer4` (`metriclab.models.freezing`).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import timm
import torch
from torch import nn
from torch.nn import functional as F

#: `weights` values this class downloads itself (what `build_extractor` accepts besides a file and None)
HUB = "hub"
#: `pooling` values: timm's own `global_pool` choices, plus GeM (p=3) computed here on 4-D feature maps
GEM = "gem"
GEM_P = 3.0


def pooled_size(model: Any) -> int:
    """The width of `model(x)` for a timm model built with num_classes=0: its head's hidden size (a pre-logits
    MLP, a concatenating pool such as `catavgmax`), else its number of features."""
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def gem(x: torch.Tensor, p: float = GEM_P, eps: float = 1e-6) -> torch.Tensor:
    """Generalised-mean pooling of a [B, C, H, W] feature map to [B, C]."""
    if x.ndim != 4:
        raise ValueError(f"pooling=gem needs a [B, C, H, W] feature map; this backbone gives shape "
                         f"{tuple(x.shape)} (a transformer?): use one of timm's pools (avg, token, ...)")
    return x.clamp(min=eps).pow(p).mean(dim=(2, 3)).pow(1.0 / p)


class TimmExtractor(nn.Module):
    """A timm backbone with a global pool, an optional projection, an optional BNNeck and optional L2 norm."""

    #: the one zoo key: timm's pretrained weights of `arch` (what OML extractors call `pretrained_models`)
    pretrained_models: Dict[str, Dict[str, str]] = {HUB: {"source": "timm pretrained=True (Hugging Face Hub)"}}

    def __init__(self, arch: str, weights: Optional[str] = None, pooling: Optional[str] = None,
                 embedding_size: Optional[int] = None, bnneck: bool = False, normalise_features: bool = False):
        """
        Args:
            arch: a timm model name (`timm.list_models()`), with or without a pretrained tag (`resnet50.a1_in1k`)
            weights: None (random init) or "hub" (timm's pretrained weights, downloaded); local files are loaded
                by `build_extractor`
            pooling: timm's `global_pool` (avg, max, avgmax, catavgmax; token, avg, map for ViTs), "gem", or None
                for the architecture's default
            embedding_size: a linear projection (no bias) to this size; None = the pooled features
            bnneck: a BatchNorm1d (bias frozen) on the embedding
            normalise_features: L2-normalise the embeddings
        """
        super().__init__()
        if weights not in (None, HUB):
            raise ValueError(f"weights={weights!r}: TimmExtractor takes None or {HUB!r}; a local weights file is "
                             f"loaded by metriclab's build_extractor")
        if not timm.is_model(arch.split(".")[0]):  # `name.tag` picks one of the name's pretrained weights
            raise ValueError(f"arch={arch!r} is not a timm model name; see timm.list_models('*pattern*')")
        kwargs: Dict[str, Any] = {} if pooling is None else {"global_pool": "" if pooling == GEM else pooling}
        self.arch, self.pooling, self.normalise_features = arch, pooling, normalise_features
        model: Any = timm.create_model(arch, pretrained=weights == HUB, num_classes=0, **kwargs)
        self.model = model
        width = int(model.num_features) if pooling == GEM else pooled_size(model)
        self.projection = nn.Linear(width, embedding_size, bias=False) if embedding_size else None
        self.feat_dim = int(embedding_size or width)
        self.bnneck = nn.BatchNorm1d(self.feat_dim) if bnneck else None
        if self.bnneck is not None:
            self.bnneck.bias.requires_grad_(False)  # the paper's BNNeck: no shift

    @property
    def input_size(self) -> tuple:
        """(C, H, W) the architecture's pretrained weights expect (timm's pretrained_cfg)."""
        return tuple(self.model.pretrained_cfg.get("input_size", (3, 224, 224)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = gem(self.model.forward_features(x)) if self.pooling == GEM else self.model(x)
        if self.projection is not None:
            x = self.projection(x)
        if self.bnneck is not None:
            x = self.bnneck(x)
        if self.normalise_features:
            x = F.normalize(x, p=2, dim=1)
        return x


__all__ = ["GEM", "HUB", "TimmExtractor", "gem", "pooled_size"]
