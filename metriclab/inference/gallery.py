"""What predict searches and for which images: the query images named on the command line, and the gallery (the
dataset's rows or a folder of class sub-folders) embedded once and kept in the on-disk cache with its faiss index."""
from __future__ import annotations

import glob
import logging
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import pandas as pd
from omegaconf import DictConfig, ListConfig, OmegaConf
from oml.datasets import ImageBaseDataset

from metriclab.core.config import build
from metriclab.core.constants import (
    CLASS_NAME_COLUMN,
    IMAGE_EXTENSIONS,
    IS_GALLERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
)
from metriclab.core.errors import ConfigError
from metriclab.data.datasets import class_names, read_dataset_csv
from metriclab.inference.embed import embed_all
from metriclab.inference.model import LoadedExtractor
from metriclab.inference.search_index import (
    GalleryIndex,
    IndexSpec,
    file_sha256,
    files_fingerprint,
    load_or_build_gallery,
)

log = logging.getLogger(__name__)

#: `gallery_rows`: validation rows with is_gallery | train rows | both
GALLERY_ROWS = ("gallery", "train", "all")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _files_of(spec: str, key: str) -> List[Path]:
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if _is_image(p))
        if not files:
            raise ConfigError(f"{key}={spec}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise ConfigError(f"{key}={spec}: the pattern matches no file")
        return files
    raise ConfigError(f"{key}={spec} does not exist: pass an image file, a folder or a quoted glob pattern")


def collect_images(images: Any, key: str = "images") -> List[Path]:
    """Files named by a path, a folder (recursive, image extensions only), a glob, or a list of those; sorted per
    item, each file once."""
    if images is None or (isinstance(images, str) and not images.strip()):
        raise ConfigError(f"`{key}` is empty: pass an image file, a folder or a quoted glob, e.g. {key}='photos/*.jpg'")
    specs = list(images) if isinstance(images, (list, tuple, ListConfig)) else [images]
    found = [f for spec in specs for f in _files_of(str(spec), key)]
    unique = list(dict.fromkeys(p.resolve() for p in found))  # a file named twice is predicted once
    if not unique:
        raise ConfigError(f"`{key}` names no file")
    return unique


def dataset_gallery(cfg: DictConfig) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """The gallery rows of the dataset CSV as (absolute path, label, class_name), and what identifies them."""
    if OmegaConf.is_missing(cfg.dataset, "root"):
        raise ConfigError("`dataset.root` is not set: pass dataset.root=<converted dataset folder> (its gallery "
                          "rows are the references) or gallery=<folder of class sub-folders>")
    rows = cfg.get("gallery_rows", "gallery")
    if rows not in GALLERY_ROWS:
        raise ConfigError(f"`gallery_rows={rows}` is not supported; choose one of {GALLERY_ROWS}")
    dataset = build(cfg.dataset, "dataset")
    root = Path(dataset.root).resolve()
    df = read_dataset_csv(root, dataset.csv, allow_outside_root=dataset.allow_outside_root)
    is_val_gallery = (df[SPLIT_COLUMN] == VALIDATION_SPLIT) & df[IS_GALLERY_COLUMN]
    is_train = df[SPLIT_COLUMN] == TRAIN_SPLIT
    mask = {"gallery": is_val_gallery, "train": is_train, "all": is_val_gallery | is_train}[rows]
    picked = df[mask].drop_duplicates(subset=PATHS_COLUMN)  # `all`: closed-protocol train images are listed twice
    if picked.empty:
        raise ConfigError(f"{root / cfg.dataset.csv}: no rows for gallery_rows={rows} "
                          f"({'validation rows with is_gallery=True' if rows == 'gallery' else rows + ' rows'})")
    table = pd.DataFrame({"path": [str(root / p) for p in picked[PATHS_COLUMN]],
                          "label": picked[LABELS_COLUMN].astype(int).to_numpy(),
                          CLASS_NAME_COLUMN: class_names(picked)})
    return table, {"source": "dataset", "root": str(root), "csv": cfg.dataset.csv, "rows": rows}


def folder_gallery(folder: str | Path) -> Tuple[pd.DataFrame, Dict[str, Any]]:
    """`<folder>/<class name>/**/<image>`; labels = class index in sorted name order (torchvision's ImageFolder)."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"gallery={folder} is not a folder: pass a folder with one sub-folder per class")
    loose = sorted(p.name for p in folder.iterdir() if _is_image(p))
    if loose:
        raise ConfigError(f"gallery={folder}: image(s) {loose[:3]} lie directly in the folder; put each image in a "
                          f"sub-folder named after its class (<gallery>/<class>/<image>)")
    class_dirs = sorted(p for p in folder.iterdir() if p.is_dir())
    names = [d.name for d in class_dirs if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.rglob("*"))]
    rows = [{"path": str(f), "label": label, CLASS_NAME_COLUMN: name}
            for label, name in enumerate(names) for f in sorted((folder / name).rglob("*")) if _is_image(f)]
    if not rows:
        raise ConfigError(f"gallery={folder} holds no class sub-folder with image files "
                          f"({', '.join(IMAGE_EXTENSIONS)})")
    return pd.DataFrame(rows), {"source": "folder", "folder": str(folder)}


def with_fingerprints(table: pd.DataFrame, parts: Dict[str, Any]) -> Dict[str, Any]:
    """`parts` plus what changes when an image or the CSV is edited or replaced under the same name."""
    prints = {"files": files_fingerprint(table["path"])}
    if parts["source"] == "dataset":
        prints["csv_sha256"] = file_sha256(Path(parts["root"]) / parts["csv"])
    return {**parts, **prints}


def index_spec(cfg: DictConfig) -> IndexSpec:
    """The `index` group (its schema: metriclab.core.schemas.IndexConfig) with predict's `distance`."""
    return IndexSpec.from_config(build(cfg.get("index"), "index"), cfg.get("distance", "euclidean"))


def flip_tta_of(cfg: DictConfig) -> bool:
    """predict's `evaluation.flip_tta` (its config holds only that key of the group)."""
    evaluation = cfg.get("evaluation") or {}
    return bool(evaluation.get("flip_tta", False))


def gallery_index(cfg: DictConfig, extractor: LoadedExtractor, transform: Any) -> GalleryIndex:
    """Gallery embeddings + faiss index from the cache when checkpoint, gallery, transforms and index match."""
    table, gallery_parts = folder_gallery(cfg.gallery) if cfg.get("gallery") else dataset_gallery(cfg)
    spec = index_spec(cfg)
    cache_dir = Path(cfg.cache_dir) if cfg.get("use_cache", True) and cfg.get("cache_dir") else None
    flip_tta = flip_tta_of(cfg)
    key_parts: Dict[str, Any] = {}
    if cache_dir is not None:  # the key hashes the checkpoint and stats every gallery file: only worth it for a cache
        key_parts = {**extractor.key_parts(), "gallery": with_fingerprints(table, gallery_parts),
                     "transforms": OmegaConf.to_container(cfg.transforms.val, resolve=True)}
        if flip_tta:  # only when on: caches written before the key existed stay valid
            key_parts["flip_tta"] = True

    def compute() -> Tuple[np.ndarray, pd.DataFrame]:
        log.info("embedding %d gallery images", len(table))
        paths = table["path"].tolist()
        emb = embed_all(extractor.model, ImageBaseDataset(paths=paths, transform=transform), paths, "gallery",
                        int(cfg.batch_size), int(cfg.num_workers), extractor.precision,
                        hint=". Replace or remove them (the converters skip unreadable files when they write the CSV)",
                        flip_tta=flip_tta)
        return emb, table

    return load_or_build_gallery(compute, key_parts, spec, cache_dir)


__all__ = ["GALLERY_ROWS", "collect_images", "dataset_gallery", "flip_tta_of", "folder_gallery", "gallery_index",
           "index_spec", "with_fingerprints"]
