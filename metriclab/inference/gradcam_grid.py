"""The GradCAM grid of explain: per worst query, its map and its retrieved images' maps as framed tiles, plus one
table row per tile saying what it is and what explains it."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

import numpy as np
import pandas as pd
import torch
from oml.const import INPUT_TENSORS_KEY

from metriclab.core.atomic import atomic_savefig
from metriclab.data.datasets import ValidationData, class_names
from metriclab.evaluation.pictures import plt, style_tile
from metriclab.inference.gradcam import overlay, similarity_cams, tensor_to_image

if TYPE_CHECKING:  # only a type here
    from metriclab.evaluation.report import RetrievalReport


@dataclass
class GridRows:
    """What the grid shows: one list of tiles per query, the CSV rows, and the raw maps (one [1 + k, H, W] each)."""

    tiles: List[List[Dict[str, Any]]] = field(default_factory=list)
    table: List[Dict[str, Any]] = field(default_factory=list)
    maps: List[np.ndarray] = field(default_factory=list)


def flat_note(cam: np.ndarray) -> str:
    """GradCAM keeps only positive evidence: a map that is 0 everywhere says no region raises the similarity."""
    return ", flat map" if float(cam.max()) == 0.0 else ""


@dataclass
class QueryExplainer:
    """Explains worst queries of one validation pass: `embeddings` in dataset row order, `report` its metrics."""

    model: torch.nn.Module
    data: ValidationData
    embeddings: torch.Tensor
    report: "RetrievalReport"
    transform: Any
    distance: str
    top_k: int
    target_layer: Optional[str] = None

    def __post_init__(self) -> None:
        self.q_rows, self.g_rows = np.flatnonzero(self.data.is_query), np.flatnonzero(self.data.is_gallery)
        self.names = class_names(self.data.df)

    def add(self, rows: GridRows, query: pd.Series) -> None:
        """One grid row: the query explained by its similarity to its top-1, each retrieved image by the query."""
        qi = int(query["query_index"])
        q_row = int(self.q_rows[qi])
        retrieved = [(int(self.g_rows[j]), float(d)) for j, d in
                     zip(self.report.topk_ids[qi][:self.top_k], self.report.topk_distances[qi][:self.top_k]) if j >= 0]
        order = [q_row] + [g for g, _ in retrieved]
        images = torch.stack([self.data.dataset[r][INPUT_TENSORS_KEY] for r in order])  # moved by grad-cam
        targets = torch.stack([self.embeddings[order[1]]] + [self.embeddings[q_row]] * len(retrieved))
        maps = similarity_cams(self.model, images, targets, self.distance, self.target_layer)
        rows.maps.append(maps)
        paths, labels = self.data.paths, self.data.labels
        tiles = [self._tile(images[0], maps[0], "blue", f"QUERY {self.names[q_row]}\n{Path(paths[q_row]).name}\n"
                                                        f"AP {query['ap']:.3f}{flat_note(maps[0])}")]
        rows.table.append({"query_index": qi, "position": 0, "path": paths[q_row], "label": int(labels[q_row]),
                           "distance": 0.0, "explained_by": f"similarity to #1 {paths[order[1]]}"})
        for c, (g_row, dist) in enumerate(retrieved, start=1):
            color = "green" if labels[g_row] == labels[q_row] else "red"
            tiles.append(self._tile(images[c], maps[c], color, f"#{c} {self.names[g_row]}\n{Path(paths[g_row]).name}"
                                                               f"\nd={dist:.3f}{flat_note(maps[c])}"))
            rows.table.append({"query_index": qi, "position": c, "path": paths[g_row], "label": int(labels[g_row]),
                               "distance": dist, "explained_by": "similarity to the query"})
        rows.tiles.append(tiles)

    def _tile(self, image: torch.Tensor, cam: np.ndarray, color: str, caption: str) -> Dict[str, Any]:
        return {"overlay": overlay(tensor_to_image(image, self.transform), cam), "color": color, "caption": caption}


def draw_gradcam_grid(tiles: List[List[Dict[str, Any]]], out_png: Path, title: str) -> Path:
    """One row per query, one tile per image (2.0 x 2.4 in at 100 dpi), the title wrapped above."""
    n_cols = max(len(r) for r in tiles)
    fig, axes = plt.subplots(len(tiles), n_cols, figsize=(2.0 * n_cols, 2.4 * len(tiles) + 0.7), squeeze=False)
    for r, row in enumerate(tiles):
        for c in range(n_cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(row):
                continue
            ax.axis("on")
            style_tile(ax, row[c]["overlay"], row[c]["caption"], row[c]["color"])
    fig.suptitle(textwrap.fill(title, width=32 * n_cols), fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_png, dpi=100)
    plt.close(fig)
    return out_png


__all__ = ["GridRows", "QueryExplainer", "draw_gradcam_grid", "flat_note"]
