"""`predict(cfg)`: the k nearest gallery images of new images, their classes, and a majority-vote class.

    python scripts/predict.py ckpt=outputs/train/<run>/checkpoints/best.ckpt dataset.root=/data/fruits \\
        images=/photos/apple.jpg k=10 [index=hnsw] [gallery=/photos/reference]

`images` is a file, a folder (searched recursively for image files), a glob pattern, or a list of these.
The gallery is the dataset's gallery rows (`gallery_rows=gallery`: validation rows with is_gallery; `train`: the
train rows; `all`: both, each path once), or a folder of class sub-folders (`gallery=<folder>`, ImageFolder layout).
Gallery embeddings and the faiss index are cached on disk (metriclab.inference.search_index). Output in the run dir:
`predictions_<YYYYmmdd-HHMMSS>.json` and one picture per query under `predictions_<YYYYmmdd-HHMMSS>/`.
The pieces live in metriclab.inference (model, embed, gallery, predictions); this module orchestrates them.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from omegaconf import DictConfig
from oml.datasets import ImageBaseDataset

from metriclab.core.atomic import write_json_atomic
from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.evaluation.postprocess import check_sizes, describe, ranked_topk, steps_from_config
from metriclab.inference.embed import embed_dataset, list_failures
from metriclab.inference.gallery import collect_images, flip_tta_of, gallery_index
from metriclab.inference.model import LoadedExtractor, calibrated_threshold, load_extractor, warn_if_transforms_differ
from metriclab.inference.onnx_model import with_model_contract
from metriclab.inference.predictions import apply_threshold, draw_prediction, prediction_records, summary_lines
from metriclab.inference.search_index import GalleryIndex

log = logging.getLogger(__name__)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"`k` must be a positive integer, got {k!r}")
    return k


def resolve_threshold(value: Any, extractor: LoadedExtractor, distance: str,
                      postprocess: Sequence[Any]) -> Optional[float]:
    """`threshold=`: null = closed set (every image gets a class); a distance; or `auto` = the calibrated one the
    checkpoint or model.json records (an error when there is none, or when it was calibrated for another distance)."""
    if value is None:
        return None
    if postprocess:
        raise ConfigError("threshold= compares plain distances: it cannot be used with postprocess= (re-ranked or "
                          "expanded distances have another scale); drop one of them")
    if isinstance(value, str) and value.strip().lower() == "auto":
        found = calibrated_threshold(extractor)
        if found is None:
            raise ConfigError("threshold=auto but the model records no calibrated threshold (a checkpoint of a "
                              "training run validated with evaluation.verification=true, or an export of one): pass "
                              "threshold=<distance> or train again")
        if found.distance is not None and found.distance != distance:
            raise ConfigError(f"threshold=auto: {found.source} calibrated its threshold for distance={found.distance},"
                              f" but predict uses distance={distance}: pass distance={found.distance}")
        log.info("threshold=auto: %.6g (calibrated at FMR %s, %s)", found.value, found.fmr, found.source)
        return found.value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"threshold={value!r}: pass a non-negative distance, auto (the calibrated one) or null")
    return float(value)


def _draw_pictures(records: Sequence[Dict[str, Any]], folder: Path, max_pictures: Any) -> List[Path]:
    shown = records if max_pictures is None else records[:int(max_pictures)]
    return [draw_prediction(r, folder / f"{n:04d}_{Path(r['image']).stem}.png") for n, r in enumerate(shown)]


def _cache_note(gallery: GalleryIndex) -> str:
    if gallery.index_from_cache:
        return "embeddings and index from cache"
    return "embeddings from cache, index built" if gallery.embeddings_from_cache else "gallery embedded"


def predict(cfg: DictConfig) -> Dict[str, Any]:
    """Predict every readable image of `cfg.images`; returns the records, the files written and the cache flags."""
    run_dir, run_name, _ = job_identity(cfg)
    if cfg.get("model"):  # an exported ONNX model: its contract's val transform
        cfg = with_model_contract(cfg)
    k = _check_k(cfg.k)
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    postprocess = steps_from_config(cfg.get("postprocess"))
    queries = [str(p) for p in collect_images(cfg.images)]
    extractor = load_extractor(cfg)
    threshold = resolve_threshold(cfg.get("threshold"), extractor, str(cfg.distance), postprocess)
    warn_if_transforms_differ(cfg, extractor.meta)
    transform = build(cfg.transforms.val, "transforms.val")
    gallery = gallery_index(cfg, extractor, transform)
    if k > len(gallery.table):
        raise ConfigError(f"k={k} but the gallery has only {len(gallery.table)} image(s): lower `k`")
    check_sizes(postprocess, len(queries), len(gallery.table))

    q_emb, ok_ids, failed = embed_dataset(extractor.model, ImageBaseDataset(paths=queries, transform=transform),
                                          int(cfg.batch_size), int(cfg.num_workers), extractor.precision,
                                          flip_tta_of(cfg))
    skipped = [{"image": queries[i], "reason": reason} for i, reason in failed]
    for s in skipped:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    if not ok_ids:
        raise ConfigError(f"none of the {len(queries)} image(s) of images={cfg.images} could be read: "
                          f"{list_failures(failed, queries)}")
    if postprocess:  # exact search over the post-processed embeddings / re-ranked distances, not the faiss index
        distances, ids = ranked_topk(postprocess, torch.from_numpy(q_emb), torch.from_numpy(gallery.embeddings), k,
                                     gallery.spec.distance)
    else:
        distances, ids = gallery.search(q_emb, k)
    records = apply_threshold(prediction_records([queries[i] for i in ok_ids], distances, ids, gallery.table),
                              threshold)
    for record in records:
        record["postprocess"] = describe(postprocess)
        record["flip_tta"] = flip_tta_of(cfg)

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = write_json_atomic(run_dir / f"predictions_{stamp}.json", records)
    pictures = _draw_pictures(records, run_dir / f"predictions_{stamp}", cfg.get("max_pictures"))
    print(f"\n{run_name}: {len(records)} image(s) predicted, {len(skipped)} skipped; gallery {len(gallery.table)} "
          f"images, index {gallery.spec.describe()} ({_cache_note(gallery)}), post-processing "
          f"{describe(postprocess)}\n" + "\n".join(summary_lines(records, k))
          + f"\npredictions: {out_json}")
    return {"run_dir": run_dir, "predictions_json": out_json, "records": records, "skipped": skipped,
            "pictures": pictures, "gallery": gallery}


__all__ = ["predict"]
