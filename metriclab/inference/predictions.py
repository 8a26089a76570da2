"""From nearest gallery neighbours to a prediction: the majority vote, one record per image, its picture."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd

from metriclab.core.atomic import atomic_savefig
from metriclab.core.constants import CLASS_NAME_COLUMN
from metriclab.evaluation.pictures import plt, read_tile, style_tile  # one style for every image grid


def majority_vote(labels: Sequence[Any], distances: Sequence[float]) -> Tuple[Any, int]:
    """The most frequent label; a tie goes to the tied label with the nearest neighbour (then the earlier one).

    Same rule as knn_accuracy in metriclab.evaluation; written out because that one returns correctness only.
    """
    if len(labels) == 0:
        raise ValueError("majority_vote needs at least one neighbour")
    counts = Counter(labels)
    top = max(counts.values())
    nearest: Dict[Any, Tuple[float, int]] = {}
    for pos, (label, dist) in enumerate(zip(labels, distances)):
        if counts[label] == top and (label not in nearest or float(dist) < nearest[label][0]):
            nearest[label] = (float(dist), pos)
    winner = min(nearest, key=lambda lab: nearest[lab])
    return winner, top


def prediction_record(image: str, ids: np.ndarray, distances: np.ndarray, table: pd.DataFrame) -> Dict[str, Any]:
    """One image's neighbours (gallery rows `ids`, nearest first; -1 = no result) and its majority-vote class."""
    neighbours = [{"path": table.at[int(j), "path"], "label": int(table.at[int(j), "label"]),
                   CLASS_NAME_COLUMN: str(table.at[int(j), CLASS_NAME_COLUMN]), "distance": float(d)}
                  for j, d in zip(ids, distances) if j >= 0]
    label, votes = majority_vote([n["label"] for n in neighbours], [n["distance"] for n in neighbours])
    name = next(n[CLASS_NAME_COLUMN] for n in neighbours if n["label"] == label)
    return {"image": image, "neighbours": neighbours, "predicted_class": name, "predicted_label": label,
            "votes": votes}


def prediction_records(paths: Sequence[str], distances: np.ndarray, ids: np.ndarray,
                       table: pd.DataFrame) -> List[Dict[str, Any]]:
    """`paths[i]` searched with result row i (`distances`, `ids`: [Q, k] from the search index)."""
    return [prediction_record(p, ids[row], distances[row], table) for row, p in enumerate(paths)]


def apply_threshold(records: List[Dict[str, Any]], threshold: Optional[float]) -> List[Dict[str, Any]]:
    """Open set: a record whose nearest neighbour is farther than `threshold` becomes ``"unknown": true`` with
    ``"predicted_class": null`` (and no predicted label); the others keep the majority vote, ``"unknown": false``.
    `threshold` None (closed set) leaves the records as they are. Every record gets ``"threshold"``."""
    for record in records:
        record["threshold"] = threshold
        if threshold is None:
            continue
        nearest = record["neighbours"][0]["distance"] if record["neighbours"] else math.inf
        record["unknown"] = bool(nearest > threshold)
        if record["unknown"]:
            record["predicted_class"], record["predicted_label"], record["votes"] = None, None, 0
    return records


def draw_prediction(record: Dict[str, Any], out_png: Path) -> Path:
    """One row: the query, then its neighbours framed green when they have the predicted class."""
    neighbours = record["neighbours"]
    n_cols = 1 + len(neighbours)
    fig, axes = plt.subplots(1, n_cols, figsize=(1.9 * n_cols, 2.6), squeeze=False)
    predicted = record["predicted_class"]

    def tile(ax, path: str, caption: str, color: str) -> None:
        style_tile(ax, read_tile(Path(path)), caption, color)

    shown = "no match" if record.get("unknown") else predicted
    tile(axes[0][0], record["image"], f"QUERY\n{Path(record['image']).name}\npredicted: {shown}", "blue")
    for c, nb in enumerate(neighbours):
        color = "green" if nb[CLASS_NAME_COLUMN] == predicted else "gray"
        tile(axes[0][1 + c], nb["path"], f"#{c + 1} {nb[CLASS_NAME_COLUMN]}\n{Path(nb['path']).name}\n"
             f"d={nb['distance']:.3f}", color)
    fig.suptitle(f"{len(neighbours)} nearest gallery images (green = the predicted class "
                 f"{predicted}, {record['votes']} of {len(neighbours)} votes)", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_png)
    plt.close(fig)
    return out_png


def _summary_line(r: Dict[str, Any], k: int) -> str:
    nearest = r["neighbours"][0]
    if r.get("unknown"):
        return (f"{Path(r['image']).name}: no match (nearest {nearest[CLASS_NAME_COLUMN]} at {nearest['distance']:.3f}"
                f" > {r['threshold']:.3f})")
    return (f"{Path(r['image']).name}: {r['predicted_class']} ({r['votes']}/{k} votes, nearest "
            f"{nearest[CLASS_NAME_COLUMN]} at {nearest['distance']:.3f})")


def summary_lines(records: Sequence[Dict[str, Any]], k: int, n_shown: int = 20) -> List[str]:
    """One printed line per prediction (the first `n_shown`), and how many more."""
    lines = [_summary_line(r, k) for r in records[:n_shown]]
    if len(records) > n_shown:
        lines.append(f"... and {len(records) - n_shown} more")
    return lines


__all__ = ["apply_threshold", "draw_prediction", "majority_vote", "prediction_record", "prediction_records",
           "summary_lines"]
