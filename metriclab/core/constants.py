"""Facts defined once: dataset-CSV columns, split names, image extensions, distances, default locations.

Torch-free and cheap to import: converters, entry points and the report read these too.
"""
from __future__ import annotations

from pathlib import Path

from metriclab.core.paths import OUTPUTS_DIR

__all__ = [
    "CATEGORIES_COLUMN", "IS_GALLERY_COLUMN", "IS_QUERY_COLUMN", "LABELS_COLUMN", "PATHS_COLUMN", "SEQUENCE_COLUMN",
    "SPLIT_COLUMN", "X1_COLUMN", "X2_COLUMN", "Y1_COLUMN", "Y2_COLUMN", "CLASS_NAME_COLUMN", "REQUIRED_COLUMNS",
    "BBOX_COLUMNS", "TRAIN_SPLIT", "VALIDATION_SPLIT", "SPLITS", "IMAGE_EXTENSIONS", "DISTANCES", "DEFAULT_MLFLOW_URI",
    "DEFAULT_ARTIFACT_ROOT", "mlflow_store_uri", "artifact_root",
]

# ------------------------------------------------------------------------------ the dataset CSV (OML's format)
# OML's own names for its columns (one definition, OML's); metriclab adds `class_name`
from oml.const import (  # noqa: E402  (cheap: omegaconf, which every entry point loads anyway)
    CATEGORIES_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SEQUENCE_COLUMN,
    SPLIT_COLUMN,
    X1_COLUMN,
    X2_COLUMN,
    Y1_COLUMN,
    Y2_COLUMN,
)

#: optional: a readable class name, written by the fruits and cars converters, shown in pictures and predictions
CLASS_NAME_COLUMN = "class_name"
REQUIRED_COLUMNS = (LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN)
BBOX_COLUMNS = (X1_COLUMN, Y1_COLUMN, X2_COLUMN, Y2_COLUMN)

TRAIN_SPLIT = "train"
VALIDATION_SPLIT = "validation"
SPLITS = (TRAIN_SPLIT, VALIDATION_SPLIT)

#: file suffixes read as images (lower case), by the converters, predict's folders and glob, and the class folders
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")

# ------------------------------------------------------------------------------------------------- geometry
#: euclidean: OML's default (L2 between raw embeddings); cosine: 1 - cosine similarity
DISTANCES = ("euclidean", "cosine")

# ------------------------------------------------------------------------------------------------ locations
#: the embedded MLflow store (MLflow 3 refuses the plain file store), when neither the config nor the
#: MLFLOW_TRACKING_URI environment variable names another
def mlflow_store_uri(outputs_dir: str | Path) -> str:
    """The embedded MLflow store of an outputs folder (configs/paths/default.yaml gets it through a resolver)."""
    return f"sqlite:///{Path(outputs_dir) / 'mlflow.db'}"


def artifact_root(outputs_dir: str | Path) -> Path:
    """Where experiments created in that store keep their artifacts."""
    return Path(outputs_dir) / "mlartifacts"


DEFAULT_MLFLOW_URI = mlflow_store_uri(OUTPUTS_DIR)
DEFAULT_ARTIFACT_ROOT = artifact_root(OUTPUTS_DIR)
