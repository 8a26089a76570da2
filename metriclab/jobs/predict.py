"""`predict(cfg)`: the k nearest gallery images of new images, their classes, and a majority-vote class.

    python scripts/predict.py ckpt=outputs/train/<run>/checkpoints/best.ckpt dataset.root=/data/fruits \
        images=/photos/apple.jpg k=10 [index=hnsw] [gallery=/photos/reference]

`images` is a file, a folder (searched recursively for image files), a glob pattern, or a list of these.
The gallery is the dataset's gallery rows (`gallery_rows=gallery`: validation rows with is_gallery; `train`: the
train rows; `all`: both, each path once), or a folder of class sub-folders (`gallery=<folder>`, ImageFolder layout).
Gallery embeddings and the faiss index are cached on disk (metriclab.inference.search_index). Output in the run dir:
`predictions_<YYYYmmdd-HHMMSS>.json` and one picture per query under `predictions_<YYYYmmdd-HHMMSS>/`.
"""
from __future__ import annotations

import glob
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pandas as pd
import torch
from oml.const import INPUT_TENSORS_KEY, IS_GALLERY_COLUMN, LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN
from oml.datasets import ImageBaseDataset
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from metriclab.core.config import build, job_identity
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import class_names, read_dataset_csv
from metriclab.models.extractors import build_extractor_for_inference, extractor_constructor_cfg
from metriclab.inference.search_index import GalleryIndex, IndexSpec, file_sha256, files_fingerprint, load_or_build_gallery
from metriclab.core.atomic import atomic_savefig, write_json_atomic

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")
GALLERY_ROWS = ("gallery", "train", "all")


# ----------------------------------------------------------------------------------------------------------------------
# inputs


def collect_images(images: Any, key: str = "images") -> List[Path]:
    """Files named by a path, a folder (recursive, image extensions only), a glob, or a list of those; sorted."""
    if images is None or (isinstance(images, str) and not images.strip()):
        raise ConfigError(f"`{key}` is empty: pass an image file, a folder or a quoted glob, e.g. {key}='photos/*.jpg'")
    specs = list(images) if isinstance(images, (list, tuple, ListConfig)) else [images]
    found: List[Path] = []
    for spec in specs:
        spec = str(spec)
        path = Path(spec).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ConfigError(f"{key}={spec}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            found += files
        elif glob.has_magic(spec):
            files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not files:
                raise ConfigError(f"{key}={spec}: the pattern matches no file")
            found += files
        else:
            raise ConfigError(f"{key}={spec} does not exist: pass an image file, a folder or a quoted glob pattern")
    unique = list(dict.fromkeys(p.resolve() for p in found))  # a file named twice is predicted once
    if not unique:
        raise ConfigError(f"`{key}` names no file")
    return unique


def majority_vote(labels: Sequence[Any], distances: Sequence[float]) -> Tuple[Any, int]:
    """The most frequent label; a tie goes to the tied label with the nearest neighbour (then the earlier one).

    Same rule as knn_accuracy in metriclab.evaluation.engine; written out because that one returns correctness only.
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


# ----------------------------------------------------------------------------------------------------------------------
# model and embeddings


@dataclass
class LoadedExtractor:
    model: torch.nn.Module
    constructor_cfg: Dict[str, Any]
    checkpoint: Optional[Path]
    checkpoint_meta: Dict[str, Any]

    def key_parts(self) -> Dict[str, Any]:
        parts: Dict[str, Any] = {"extractor": self.constructor_cfg}
        weights = self.constructor_cfg.get("weights")
        if self.checkpoint is not None:
            parts["checkpoint_sha256"] = file_sha256(self.checkpoint)
        elif isinstance(weights, str) and Path(weights).is_file():  # a weights file can be overwritten in place
            parts["weights_sha256"] = file_sha256(Path(weights))
        return parts


def resolve_device(name: Any) -> torch.device:
    """`auto` = the GPU when torch sees one, else the CPU; `cpu`, `cuda`, `cuda:1`... as given."""
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"`device={name}` is not a torch device; use auto, cpu or cuda[:N]") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"`device={name}` but torch sees no GPU here; use device=cpu (or auto)")
    return device


def load_extractor(cfg: DictConfig) -> LoadedExtractor:
    """`cfg.ckpt` (our checkpoint: its stored architecture unless extractor_from_ckpt=false) or the `extractor`
    config's own weights (zoo key / random init) when ckpt is null; on `cfg.device`."""
    ckpt = cfg.get("ckpt")
    model, loaded, extractor_cfg = build_extractor_for_inference(cfg.extractor, ckpt,
                                                                 cfg.get("extractor_from_ckpt", True))
    meta: Dict[str, Any] = loaded.get("metriclab") or {}
    constructor = OmegaConf.to_container(extractor_constructor_cfg(extractor_cfg), resolve=True)
    model.eval().to(resolve_device(cfg.get("device", "auto")))
    return LoadedExtractor(model, constructor, Path(ckpt).resolve() if ckpt else None, meta)


class _SafeItems(Dataset):
    """Items of an OML dataset as (index, tensor, None) or (index, None, reason): one bad file does not stop a batch."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        try:
            return i, self.dataset[i][INPUT_TENSORS_KEY], None
        except Exception as e:  # unreadable/undecodable file: reported by the caller with its path
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else ""
            if "_src.empty()" in msg:  # cv2's message for bytes it cannot decode
                msg = "not a decodable image"
            return i, None, f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _collate(items):
    ok = [(i, t) for i, t, _ in items if t is not None]
    bad = [(i, reason) for i, _, reason in items if reason is not None]
    tensors = torch.stack([t for _, t in ok]) if ok else None
    return [i for i, _ in ok], tensors, bad


@torch.no_grad()
def embed_dataset(model: torch.nn.Module, dataset: Dataset, batch_size: int = 128,
                  num_workers: int = 0) -> Tuple[np.ndarray, List[int], List[Tuple[int, str]]]:
    """Embeddings of the readable items (float32 [n_ok, D], in item order), their item indices, and the failures."""
    model.eval()
    device = next(model.parameters()).device
    extract = getattr(model, "extract", model)
    loader = DataLoader(_SafeItems(dataset), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=_collate)
    chunks, ok_ids, failed = [], [], []
    for ids, tensors, bad in loader:
        failed += bad
        if tensors is not None:
            chunks.append(extract(tensors.to(device)).detach().float().cpu().numpy())
            ok_ids += ids
    emb = np.concatenate(chunks) if chunks else np.zeros((0, 0), dtype=np.float32)
    return emb.astype(np.float32, copy=False), ok_ids, failed


# ----------------------------------------------------------------------------------------------------------------------
# galleries


def list_failures(failed: List[Tuple[int, str]], paths: Sequence[str], n: int = 5) -> str:
    """The first n unreadable items as `path (reason)`, and how many more."""
    shown = "; ".join(f"{paths[i]} ({reason})" for i, reason in failed[:n])
    return shown + (f"; and {len(failed) - n} more" if len(failed) > n else "")


def dataset_gallery(cfg: DictConfig) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """The gallery rows of the dataset CSV as (absolute path, label, class_name), and what identifies them."""
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("`dataset.root` is not set: pass dataset.root=<converted dataset folder> (its gallery "
                          "rows are the references) or gallery=<folder of class sub-folders>")
    rows = cfg.get("gallery_rows", "gallery")
    if rows not in GALLERY_ROWS:
        raise ConfigError(f"`gallery_rows={rows}` is not supported; choose one of {GALLERY_ROWS}")
    root = Path(cfg.dataset.root).resolve()
    df = read_dataset_csv(root, cfg.dataset.csv)
    is_val_gallery = (df[SPLIT_COLUMN] == "validation") & df[IS_GALLERY_COLUMN]
    is_train = df[SPLIT_COLUMN] == "train"
    mask = {"gallery": is_val_gallery, "train": is_train, "all": is_val_gallery | is_train}[rows]
    picked = df[mask].drop_duplicates(subset=PATHS_COLUMN)  # `all`: closed-protocol train images are listed twice
    if picked.empty:
        raise ConfigError(f"{root / cfg.dataset.csv}: no rows for gallery_rows={rows} "
                          f"({'validation rows with is_gallery=True' if rows == 'gallery' else rows + ' rows'})")
    table = pd.DataFrame({"path": [str(root / p) for p in picked[PATHS_COLUMN]],
                          "label": picked[LABELS_COLUMN].astype(int).to_numpy(), "class_name": class_names(picked)})
    return table, {"source": "dataset", "root": str(root), "csv": cfg.dataset.csv, "rows": rows}


def folder_gallery(folder: str | Path) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """`<folder>/<class name>/**/<image>`; labels = class index in sorted name order (torchvision's ImageFolder)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"gallery={folder} is not a folder: pass a folder with one sub-folder per class")
    loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if loose:
        raise ConfigError(f"gallery={folder}: image(s) {loose[:3]} lie directly in the folder; put each image in a "
                          f"sub-folder named after its class (<gallery>/<class>/<image>)")
    rows = []
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    names = [d.name for d in class_dirs if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.rglob("*"))]
    for label, name in enumerate(names):
        for f in sorted((folder / name).rglob("*")):
            if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS:
                rows.append({"path": str(f), "label": label, "class_name": name})
    if not rows:
        raise ConfigError(f"gallery={folder} holds no class sub-folder with image files ({', '.join(IMAGE_EXTENSIONS)})")
    return pd.DataFrame(rows), {"source": "folder", "folder": str(folder)}


def _with_fingerprints(table: pd.DataFrame, parts: Dict[str, Any]) -> Dict[str, Any]:
    """`parts` plus what changes when an image or the CSV is edited or replaced under the same name."""
    prints = {"files": files_fingerprint(table["path"])}
    if parts["source"] == "dataset":
        prints["csv_sha256"] = file_sha256(Path(parts["root"]) / parts["csv"])
    return {**parts, **prints}


def gallery_index(cfg: DictConfig, extractor: LoadedExtractor, transform: Any) -> GalleryIndex:
    """Gallery embeddings + faiss index from the cache when checkpoint, gallery, transforms and index match."""
    table, gallery_parts = folder_gallery(cfg.gallery) if cfg.get("gallery") else dataset_gallery(cfg)
    spec = IndexSpec.from_cfg(cfg.get("index"), cfg.get("distance", "euclidean"))
    cache_dir = Path(cfg.cache_dir) if cfg.get("use_cache", True) and cfg.get("cache_dir") else None
    key_parts: Dict[str, Any] = {}
    if cache_dir is not None:  # the key hashes the checkpoint and stats every gallery file: only worth it for a cache
        key_parts = {**extractor.key_parts(), "gallery": _with_fingerprints(table, gallery_parts),
                     "transforms": OmegaConf.to_container(cfg.transforms.val, resolve=True)}

    def compute() -> Tuple[np.ndarray, pd.DataFrame]:
        log.info("embedding %d gallery images", len(table))
        dataset = ImageBaseDataset(paths=table["path"].tolist(), transform=transform)
        emb, _, failed = embed_dataset(extractor.model, dataset, int(cfg.batch_size), int(cfg.num_workers))
        if failed:
            raise ConfigError(f"{len(failed)} gallery image(s) cannot be read: "
                              f"{list_failures(failed, table['path'].tolist())}. Replace or remove them (the "
                              f"converters skip unreadable files when they write the CSV)")
        return emb, table

    return load_or_build_gallery(compute, key_parts, spec, cache_dir)


def _warn_if_transforms_differ(cfg: DictConfig, meta: Dict[str, Any]) -> None:
    """The training run's config is next to its checkpoints: a different val transform gives wrong neighbours."""
    run_dir = meta.get("run_dir")
    config_yaml = Path(run_dir) / "config.yaml" if run_dir else None
    if config_yaml is None or not config_yaml.is_file():
        return
    try:
        trained = OmegaConf.load(config_yaml).transforms.val
    except Exception:  # an unreadable training config only costs us this check
        return
    ours = OmegaConf.to_container(cfg.transforms.val, resolve=True)
    theirs = OmegaConf.to_container(trained, resolve=False)
    if ours != theirs:
        log.warning("transforms.val differs from the training run's (%s): %s vs %s. Pass the same transforms "
                    "group (e.g. transforms=digits) or the neighbours will be wrong", config_yaml, ours, theirs)


# ----------------------------------------------------------------------------------------------------------------------
# the job


def _draw_prediction(record: Dict[str, Any], out_png: Path) -> None:
    from metriclab.evaluation.pictures import plt, read_tile, style_tile  # one style for every image grid

    neighbours = record["neighbours"]
    n_cols = 1 + len(neighbours)
    fig, axes = plt.subplots(1, n_cols, figsize=(1.9 * n_cols, 2.6), squeeze=False)
    predicted = record["predicted_class"]

    def tile(ax, path: str, caption: str, color: str) -> None:
        style_tile(ax, read_tile(Path(path)), caption, color)

    tile(axes[0][0], record["image"], f"QUERY\n{Path(record['image']).name}\npredicted: {predicted}", "blue")
    for c, nb in enumerate(neighbours):
        color = "green" if nb["class_name"] == predicted else "gray"
        tile(axes[0][1 + c], nb["path"], f"#{c + 1} {nb['class_name']}\n{Path(nb['path']).name}\n"
             f"d={nb['distance']:.3f}", color)
    fig.suptitle(f"{len(neighbours)} nearest gallery images (green = the predicted class "
                 f"{predicted}, {record['votes']} of {len(neighbours)} votes)", fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out_png)
    plt.close(fig)


def predict(cfg: DictConfig) -> Dict[str, Any]:
    """Predict every readable image of `cfg.images`; returns the records, the files written and the cache flags."""
    run_dir, run_name, _ = job_identity(cfg)
    k = cfg.k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"`k` must be a positive integer, got {k!r}")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    queries = collect_images(cfg.images)
    extractor = load_extractor(cfg)
    _warn_if_transforms_differ(cfg, extractor.checkpoint_meta)
    transform = build(cfg.transforms.val, "transforms.val")
    gallery = gallery_index(cfg, extractor, transform)
    if k > len(gallery.table):
        raise ConfigError(f"k={k} but the gallery has only {len(gallery.table)} image(s): lower `k`")

    query_paths = [str(p) for p in queries]
    q_emb, ok_ids, failed = embed_dataset(extractor.model, ImageBaseDataset(paths=query_paths, transform=transform),
                                          int(cfg.batch_size), int(cfg.num_workers))
    skipped = [{"image": query_paths[i], "reason": reason} for i, reason in failed]
    for s in skipped:
        log.warning("skipped %s: %s", s["image"], s["reason"])
    if not ok_ids:
        raise ConfigError(f"none of the {len(queries)} image(s) of images={cfg.images} could be read: "
                          f"{list_failures(failed, query_paths)}")

    distances, ids = gallery.search(q_emb, k)
    table = gallery.table
    records = []
    for row, qi in enumerate(ok_ids):
        neighbours = [{"path": table.at[int(j), "path"], "label": int(table.at[int(j), "label"]),
                       "class_name": str(table.at[int(j), "class_name"]), "distance": float(d)}
                      for j, d in zip(ids[row], distances[row]) if j >= 0]
        label, votes = majority_vote([n["label"] for n in neighbours], [n["distance"] for n in neighbours])
        name = next(n["class_name"] for n in neighbours if n["label"] == label)
        records.append({"image": query_paths[qi], "neighbours": neighbours, "predicted_class": name,
                        "predicted_label": label, "votes": votes})

    stamp = time.strftime("%Y%m%d-%H%M%S")
    out_json = run_dir / f"predictions_{stamp}.json"
    write_json_atomic(out_json, records)
    pictures: List[Path] = []
    max_pictures = cfg.get("max_pictures")
    for n, record in enumerate(records):
        if max_pictures is not None and n >= int(max_pictures):
            break
        png = run_dir / f"predictions_{stamp}" / f"{n:04d}_{Path(record['image']).stem}.png"
        _draw_prediction(record, png)
        pictures.append(png)

    cache_note = ("embeddings and index from cache" if gallery.index_from_cache else
                  "embeddings from cache, index built" if gallery.embeddings_from_cache else "gallery embedded")
    lines = [f"{Path(r['image']).name}: {r['predicted_class']} ({r['votes']}/{k} votes, nearest "
             f"{r['neighbours'][0]['class_name']} at {r['neighbours'][0]['distance']:.3f})" for r in records[:20]]
    more = f"\n... and {len(records) - 20} more" if len(records) > 20 else ""
    print(f"\n{run_name}: {len(records)} image(s) predicted, {len(skipped)} skipped; gallery {len(table)} images, "
          f"index {gallery.spec.describe()} ({cache_note})\n" + "\n".join(lines) + more +
          f"\npredictions: {out_json}")
    return {"run_dir": run_dir, "predictions_json": out_json, "records": records, "skipped": skipped,
            "pictures": pictures, "gallery": gallery}


__all__ = ["collect_images", "dataset_gallery", "embed_dataset", "folder_gallery", "gallery_index", "list_failures",
           "load_extractor", "majority_vote", "predict", "resolve_device"]
