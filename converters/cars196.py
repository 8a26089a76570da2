"""Stanford Cars (Cars196) folder -> OML CSV, with the metric-learning or the official split.

``--protocol metric`` (default, Song et al. 2016): classes 1-98 train, classes 99-196 validation, every
validation image both query and gallery. ``--protocol stanford``: cars_train/ train, cars_test/ validation.
Labels are the 1-based class ids of the .mat files; ``category`` is the manufacturer.

Layouts: the original release (devkit/ + cars_test_annos_withlabels.mat), torchvision's ROOT/stanford_cars/,
and re-uploads with nested cars_train/cars_train/ or the .mat files next to the image folders.

    python converters/cars196.py ROOT [--protocol metric|stanford] [--no-bboxes] [--out CSV] [--strict]
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.io
from PIL import Image

from converters.common import (
    TRAIN,
    VALIDATION,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    is_image_name,
    list_some,
    make_rows_frame,
    rel_posix,
    run_cli,
    scan_image_files,
)
from metriclab.core.constants import (
    CATEGORIES_COLUMN,
    CLASS_NAME_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SPLIT_COLUMN,
    X1_COLUMN,
    X2_COLUMN,
    Y1_COLUMN,
    Y2_COLUMN,
)

META_FILE, TRAIN_ANNOS_FILE = "cars_meta.mat", "cars_train_annos.mat"
TEST_ANNOS_FILE, UNLABELLED_TEST_ANNOS_FILE = "cars_test_annos_withlabels.mat", "cars_test_annos.mat"
TRAIN_IMAGES_DIR, TEST_IMAGES_DIR = "cars_train", "cars_test"
ROOT_CANDIDATES = (".", "stanford_cars")  # the folder as released, torchvision's wrapper
MAT_SEARCH_DIRS = ("devkit", ".")  # devkit/ in the release, next to the images in re-uploads
ANNOTATION_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
BOX_FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")
METRIC_TRAIN_LAST_CLASS = 98  # classes 1..98 train, 99..196 validation
MULTI_WORD_MAKES = ("AM General", "Aston Martin", "Land Rover")
PROTOCOLS = ("metric", "stanford")

PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = {
    "metric": {
        "classes in cars_meta.mat": 196,
        "train images": 8_054,
        "train classes": 98,
        "validation images": 8_131,
        "validation classes": 98,
    },
    "stanford": {
        "classes in cars_meta.mat": 196,
        "train images": 8_144,
        "train classes": 196,
        "validation images": 8_041,
        "validation classes": 196,
    },
}


@dataclass(frozen=True)
class CarsLayout:
    base: Path
    meta: Path
    train_annotations: Path
    test_annotations: Path
    train_images: Path
    test_images: Path


@dataclass(frozen=True)
class CarAnnotation:
    fname: str
    class_id: int
    box: tuple[int, int, int, int]  # x_1, y_1, x_2, y_2


def manufacturer(class_name: str) -> str:
    """'Aston Martin V8 Vantage Coupe 2012' -> 'Aston Martin'; other makes are one word ('Rolls-Royce', 'smart')."""
    for make in MULTI_WORD_MAKES:
        if class_name == make or class_name.startswith(make + " "):
            return make
    return class_name.split(" ", 1)[0]


def _find_mat(base: Path, name: str) -> Path | None:
    for folder in MAT_SEARCH_DIRS:
        if (base / folder / name).is_file():
            return base / folder / name
    return None


def _find_images_dir(base: Path, name: str) -> Path:
    """cars_train/ itself, or the nested cars_train/cars_train/ of a Kaggle re-upload."""
    outer = base / name
    if not outer.is_dir():
        raise ConversionError(f"Cars196: missing image folder {name}/ in {base}")
    for candidate in (outer, outer / name):
        if candidate.is_dir() and any(e.is_file() and is_image_name(e.name) for e in os.scandir(candidate)):
            return candidate
    raise ConversionError(f"Cars196: {outer} holds no images (looked in {name}/ and {name}/{name}/)")


def find_cars_layout(root: Path) -> CarsLayout:
    bases = [
        root / c for c in ROOT_CANDIDATES if (root / c / TRAIN_IMAGES_DIR).is_dir() or (root / c / "devkit").is_dir()
    ]
    if not bases:
        raise ConversionError(
            f"Cars196: found neither {TRAIN_IMAGES_DIR}/ nor devkit/ in {root} or {root / 'stanford_cars'}. "
            f"Pass the folder that holds {TRAIN_IMAGES_DIR}/, {TEST_IMAGES_DIR}/ and devkit/."
        )
    base = bases[0]
    found = {name: _find_mat(base, name) for name in (META_FILE, TRAIN_ANNOS_FILE, TEST_ANNOS_FILE)}
    if found[TEST_ANNOS_FILE] is None and _find_mat(base, UNLABELLED_TEST_ANNOS_FILE) is not None:
        raise ConversionError(
            f"Cars196: only {UNLABELLED_TEST_ANNOS_FILE} found, which has no class labels. Put "
            f"{TEST_ANNOS_FILE} (released separately from the devkit) in {base} or {base / 'devkit'}."
        )
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ConversionError(f"Cars196: missing {', '.join(missing)} (looked in {base / 'devkit'} and {base})")
    return CarsLayout(
        base=base,
        meta=found[META_FILE],
        train_annotations=found[TRAIN_ANNOS_FILE],
        test_annotations=found[TEST_ANNOS_FILE],
        train_images=_find_images_dir(base, TRAIN_IMAGES_DIR),
        test_images=_find_images_dir(base, TEST_IMAGES_DIR),
    )


def _load_mat(path: Path, key: str, root: Path) -> np.ndarray:
    try:
        mat = scipy.io.loadmat(path)
    except Exception as e:  # scipy raises several types for a damaged or non-MATLAB file
        raise ConversionError(f"{rel_posix(path, root)}: cannot read it as a MATLAB file ({e})") from e
    if key not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ConversionError(f"{rel_posix(path, root)}: no variable '{key}' (has {keys})")
    return mat[key]


def _one_value(value: object, where: str) -> object:
    # loadmat wraps every struct field in a (1, 1) or (1,) array; squeeze_me=True would give scalars.
    values = np.asarray(value).ravel()
    if values.size != 1:
        raise ConversionError(f"{where}: expected one value, found {values.size}")
    return values[0]


def _as_int(value: object, where: str) -> int:
    # Field types vary per entry (uint8 for small values, uint16 for large): go to Python int at once.
    item = _one_value(value, where)
    if not isinstance(item, (int, np.integer, float, np.floating)) or float(item) != int(item):
        raise ConversionError(f"{where}: expected an integer, found {item!r}")
    return int(item)


def load_class_names(path: Path, root: Path) -> list[str]:
    names = _load_mat(path, "class_names", root)
    return [str(_one_value(x, f"{rel_posix(path, root)} class_names[{i}]")) for i, x in enumerate(names.ravel())]


def load_annotations(path: Path, root: Path, n_classes: int) -> list[CarAnnotation]:
    rel = rel_posix(path, root)
    annotations = _load_mat(path, "annotations", root)
    fields = annotations.dtype.names or ()
    missing = [f for f in ANNOTATION_FIELDS if f not in fields]
    if missing:
        hint = f" {UNLABELLED_TEST_ANNOS_FILE} has no labels: use {TEST_ANNOS_FILE}." if "class" in missing else ""
        raise ConversionError(f"{rel}: field(s) {missing} missing from 'annotations' (has {list(fields)}).{hint}")
    result, seen = [], set()
    for i, entry in enumerate(annotations.ravel()):
        where = f"{rel} annotations[{i}]"
        fname = str(_one_value(entry["fname"], f"{where}.fname"))
        class_id = _as_int(entry["class"], f"{where}.class")
        box = tuple(_as_int(entry[f], f"{where}.{f}") for f in BOX_FIELDS)
        if not 1 <= class_id <= n_classes:
            raise ConversionError(f"{where} ({fname}): class {class_id} outside 1..{n_classes} (ids are 1-based)")
        if fname in seen:
            raise ConversionError(f"{where}: {fname} is annotated twice")
        seen.add(fname)
        result.append(CarAnnotation(fname, class_id, box))
    if not result:
        raise ConversionError(f"{rel}: no annotations")
    return result


def _check_images(
    annotations: list[CarAnnotation], images_dir: Path, root: Path, check_boxes: bool, report: ConversionReport
) -> None:
    """Every annotated image exists (and, with boxes, its box lies inside it); extra files are reported."""
    images = scan_image_files(images_dir, root, report)  # one listing serves the missing check and the report
    present = {entry.name for entry, _ in images if entry.is_file()}
    missing, unreadable, bad_boxes = [], [], []
    for a in annotations:
        path = images_dir / a.fname
        rel = rel_posix(path, root)
        # fnames are bare names in every layout; only one not listed (e.g. cased otherwise) costs a stat.
        if a.fname not in present and not path.is_file():
            missing.append(rel)
            continue
        if not check_boxes:
            continue
        try:
            with Image.open(path) as image:  # reads the header only
                width, height = image.size
        except Exception as e:  # PIL raises several types for non-images
            unreadable.append(f"{rel} ({e})")
            continue
        x1, y1, x2, y2 = a.box
        if not (0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height):
            bad_boxes.append(f"{rel}: box x_1={x1}, y_1={y1}, x_2={x2}, y_2={y2} vs image {width}x{height}")
    if missing:
        raise ConversionError(f"{len(missing):,} annotated image(s) missing: {list_some(missing)}")
    if unreadable:
        raise ConversionError(f"{len(unreadable):,} image(s) cannot be opened: {list_some(unreadable)}")
    if bad_boxes:
        raise ConversionError(
            f"{len(bad_boxes):,} box(es) do not lie inside their image (need 0 <= x_1 < x_2 <= width, "
            f"0 <= y_1 < y_2 <= height): {list_some(bad_boxes)}. Fix the annotation or pass --no-bboxes."
        )
    annotated = {a.fname for a in annotations}
    for entry, rel in images:
        if entry.name not in annotated:
            report.skip("images without an annotation ignored", rel)


Source = tuple[list[CarAnnotation], Path, str]  # a folder's annotations, its images, its official split


def _protocol_split(class_id: int, protocol: str, folder_split: str) -> str:
    """The metric protocol splits by class id; the stanford protocol keeps the official (folder) split."""
    if protocol == "metric":
        return TRAIN if class_id <= METRIC_TRAIN_LAST_CLASS else VALIDATION
    return folder_split


def _build_rows_frame(
    sources: list[Source], class_names: list[str], protocol: str, bboxes: bool, root: Path
) -> pd.DataFrame:
    """One row per annotated image (validation images are query and gallery), sorted by split, then path."""
    rows = []
    for split_annotations, images_dir, folder_split in sources:
        for a in split_annotations:
            split = _protocol_split(a.class_id, protocol, folder_split)
            name = class_names[a.class_id - 1]  # class ids are 1-based
            row = {
                LABELS_COLUMN: a.class_id,
                PATHS_COLUMN: rel_posix(images_dir / a.fname, root),
                SPLIT_COLUMN: split,
                IS_QUERY_COLUMN: None if split == TRAIN else True,
                IS_GALLERY_COLUMN: None if split == TRAIN else True,
                CATEGORIES_COLUMN: manufacturer(name),
                CLASS_NAME_COLUMN: name,
            }
            if bboxes:
                row.update(dict(zip((X1_COLUMN, Y1_COLUMN, X2_COLUMN, Y2_COLUMN), a.box)))
            rows.append(row)
    columns = [LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN]
    columns += [CATEGORIES_COLUMN, CLASS_NAME_COLUMN] + ([X1_COLUMN, Y1_COLUMN, X2_COLUMN, Y2_COLUMN] if bboxes else [])
    df = make_rows_frame(rows, columns)
    return df.sort_values([SPLIT_COLUMN, PATHS_COLUMN], kind="stable", ignore_index=True)


def _check_counts(
    df: pd.DataFrame,
    n_classes: int,
    protocol: str,
    expected_counts: Mapping[str, int] | None,
    strict: bool,
    report: ConversionReport,
) -> None:
    """Images and classes per split against the published counts of the protocol (or ``expected_counts``)."""
    is_train = df[SPLIT_COLUMN] == TRAIN
    actual = {
        "classes in cars_meta.mat": n_classes,
        "train images": int(is_train.sum()),
        "train classes": df.loc[is_train, LABELS_COLUMN].nunique(),
        "validation images": int((~is_train).sum()),
        "validation classes": df.loc[~is_train, LABELS_COLUMN].nunique(),
    }
    expected = PUBLISHED_COUNTS[protocol] if expected_counts is None else expected_counts
    check_expected_counts(actual, expected, strict=strict, report=report, what=f"Cars196 {protocol}-protocol")


def convert_cars196(
    root: Path | str,
    *,
    protocol: str = "metric",
    bboxes: bool = True,
    strict: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    if protocol not in PROTOCOLS:
        raise ConversionError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    root = Path(root)
    layout = find_cars_layout(root)
    report = ConversionReport(f"Cars196 ({protocol} protocol)", label_noun="classes")
    class_names = load_class_names(layout.meta, root)
    sources: list[Source] = [
        (load_annotations(layout.train_annotations, root, len(class_names)), layout.train_images, TRAIN),
        (load_annotations(layout.test_annotations, root, len(class_names)), layout.test_images, VALIDATION),
    ]
    for split_annotations, images_dir, _ in sources:
        _check_images(split_annotations, images_dir, root, bboxes, report)
    mat_files = (layout.meta, layout.train_annotations, layout.test_annotations)
    report.note(
        "read " + ", ".join(rel_posix(p, root) for p in mat_files)
        + f"; images in {rel_posix(layout.train_images, root)}/ and {rel_posix(layout.test_images, root)}/"
    )
    df = _build_rows_frame(sources, class_names, protocol, bboxes, root)
    _check_counts(df, len(class_names), protocol, expected_counts, strict, report)
    report.note(f"{df[CATEGORIES_COLUMN].nunique()} manufacturers in the category column")
    return Conversion(df, report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Stanford Cars (Cars196) -> OML dataset.csv.")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="metric",
        help="metric: classes 1-98 train / 99-196 validation (default); stanford: the official image split",
    )
    parser.add_argument("--no-bboxes", action="store_true", help="leave out the x_1, y_1, x_2, y_2 columns")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        lambda a: convert_cars196(a.root, protocol=a.protocol, bboxes=not a.no_bboxes, strict=a.strict),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
