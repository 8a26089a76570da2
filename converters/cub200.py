"""CUB-200-2011 folder -> OML CSV, with the zero-shot (metric-learning) or the official split.

``--protocol zero_shot`` (default; the protocol metric-learning papers report): classes 1-100 train (5,864
images), classes 101-200 validation (5,924), every validation image both query and gallery (leave-one-out
Recall@K). ``--protocol closed``: the official ``train_test_split.txt`` (5,994 train / 5,794 validation
images), where all 200 classes are on both sides, as OML's converter does: its scores are not comparable
with zero-shot papers. Labels are the 1-based class ids; ``class_name`` is the class without its number
(``001.Black_footed_Albatross`` -> ``Black footed Albatross``).

Files of the release (``CUB_200_2011/``), no header lines, ids 1-based, one entry a line:
``images.txt`` ``<image_id> <image_name>`` (under ``images/``), ``image_class_labels.txt`` ``<image_id>
<class_id>``, ``train_test_split.txt`` ``<image_id> <is_training_image>`` (1 train, 0 test), ``classes.txt``
``<class_id> <class_name>``, ``bounding_boxes.txt`` ``<image_id> <x> <y> <width> <height>`` in pixels (floats).
Boxes (on by default, ``--no-bboxes`` leaves them out) become x_1 = int(x), y_1 = int(y), x_2 = int(x + width),
y_2 = int(y + height), clipped to the image. A malformed line is an error naming the file and the line; so
is an image whose class folder (``001.``) disagrees with its label.

    python converters/cub200.py ROOT [--protocol zero_shot|closed] [--no-bboxes] [--out CSV] [--strict]
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd

from converters.common import (
    DEFAULT_CSV_NAME,
    TRAIN,
    VALIDATION,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    make_rows_frame,
    rel_posix,
    run_cli,
)
from converters.listfiles import (
    Box,
    ListLine,
    check_listed_images,
    check_relative_path,
    clip_box_to_image,
    parse_int,
    read_list_lines,
)
from metriclab.core.constants import (
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

IMAGES_FILE, LABELS_FILE, SPLIT_FILE = "images.txt", "image_class_labels.txt", "train_test_split.txt"
CLASSES_FILE, BOXES_FILE = "classes.txt", "bounding_boxes.txt"
IMAGES_DIR = "images"
ROOT_CANDIDATES = (".", "CUB_200_2011")
N_CLASSES = 200
ZERO_SHOT_TRAIN_LAST_CLASS = 100  # classes 1..100 train, 101..200 validation
PROTOCOLS = ("zero_shot", "closed")

PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = {
    "zero_shot": {
        "images": 11_788,
        "classes": N_CLASSES,
        "train images": 5_864,
        "train classes": 100,
        "validation images": 5_924,
        "validation classes": 100,
    },
    "closed": {
        "images": 11_788,
        "classes": N_CLASSES,
        "train images": 5_994,
        "train classes": N_CLASSES,
        "validation images": 5_794,
        "validation classes": N_CLASSES,
    },
}

BOX_COLUMNS = [X1_COLUMN, Y1_COLUMN, X2_COLUMN, Y2_COLUMN]
COLUMNS = [LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN, CLASS_NAME_COLUMN]


@dataclass(frozen=True)
class Bird:
    image_id: int
    name: str  # as in images.txt, relative to images/
    class_id: int
    is_training: bool
    where: str  # its images.txt line


def find_cub_base(root: Path) -> Path:
    for candidate in ROOT_CANDIDATES:
        if (root / candidate / IMAGES_FILE).is_file():
            return root / candidate
    raise ConversionError(
        f"CUB-200-2011: {IMAGES_FILE} not found in {root} or {root / 'CUB_200_2011'}. Pass the folder that holds "
        f"{IMAGES_FILE}, {LABELS_FILE}, {SPLIT_FILE} and {IMAGES_DIR}/."
    )


def _by_image_id(lines: list[ListLine]) -> dict[int, ListLine]:
    """image_id (field 1) -> its line; a repeated id is an error naming both lines."""
    result: dict[int, ListLine] = {}
    for line in lines:
        image_id = parse_int(line.fields[0], line.where, "image_id", low=1)
        if image_id in result:
            raise ConversionError(f"{line.where}: image_id {image_id} is already listed at {result[image_id].where}")
        result[image_id] = line
    return result


def _same_ids(reference: dict[int, ListLine], other: dict[int, ListLine], other_file: str) -> None:
    missing = sorted(reference.keys() - other.keys())
    if missing:
        line = reference[missing[0]]
        raise ConversionError(f"{line.where}: image_id {missing[0]} has no line in {other_file}")
    extra = sorted(other.keys() - reference.keys())
    if extra:
        raise ConversionError(f"{other[extra[0]].where}: image_id {extra[0]} is not in {IMAGES_FILE}")


def load_class_names(path: Path, root: Path) -> dict[int, str]:
    """classes.txt: class id -> 'Black footed Albatross' (the number prefix and underscores dropped)."""
    names: dict[int, str] = {}
    for line in read_list_lines(path, root, 2):
        class_id = parse_int(line.fields[0], line.where, "class_id", low=1, high=N_CLASSES)
        if class_id in names:
            raise ConversionError(f"{line.where}: class_id {class_id} is listed twice")
        names[class_id] = line.fields[1].split(".", 1)[-1].replace("_", " ")
    return names


def load_birds(base: Path, root: Path) -> list[Bird]:
    """images.txt joined with image_class_labels.txt and train_test_split.txt on image_id, sorted by image_id."""
    images = _by_image_id(read_list_lines(base / IMAGES_FILE, root, 2))
    labels = _by_image_id(read_list_lines(base / LABELS_FILE, root, 2))
    splits = _by_image_id(read_list_lines(base / SPLIT_FILE, root, 2))
    _same_ids(images, labels, LABELS_FILE)
    _same_ids(images, splits, SPLIT_FILE)
    birds = []
    for image_id in sorted(images):
        line = images[image_id]
        name = check_relative_path(line.fields[1], line.where)
        label_line = labels[image_id]
        class_id = parse_int(label_line.fields[1], label_line.where, "class_id", low=1, high=N_CLASSES)
        split_line = splits[image_id]
        is_training = parse_int(split_line.fields[1], split_line.where, "is_training_image", low=0, high=1)
        folder = name.split("/", 1)[0] if "/" in name else ""
        if not folder.startswith(f"{class_id:03d}."):
            raise ConversionError(
                f"{line.where}: {name} is not in a {class_id:03d}.<name>/ folder, but {label_line.where} gives it "
                f"class {class_id}"
            )
        birds.append(Bird(image_id, name, class_id, bool(is_training), line.where))
    return birds


def load_boxes(path: Path, root: Path, birds: list[Bird], base: Path, report: ConversionReport) -> list[Box]:
    """Each bird's box from bounding_boxes.txt (x, y, width, height -> corners, truncated), clipped to its image."""
    lines = _by_image_id(read_list_lines(path, root, 5))
    _same_ids({b.image_id: ListLine(b.where, []) for b in birds}, lines, BOXES_FILE)
    boxes, n_clipped = [], 0
    for bird in birds:
        line = lines[bird.image_id]
        values = []
        for text, what in zip(line.fields[1:], ("x", "y", "width", "height")):
            try:
                value = float(text)
            except ValueError:
                raise ConversionError(f"{line.where}: {what} must be a number, found {text!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ConversionError(f"{line.where}: {what} must be a finite number >= 0, found {text!r}")
            values.append(value)
        x, y, w, h = values
        box = (int(x), int(y), int(x + w), int(y + h))
        if not (box[0] < box[2] and box[1] < box[3]):
            raise ConversionError(f"{line.where}: box x={x}, y={y}, width={w}, height={h} is empty")
        clipped = clip_box_to_image(box, base / IMAGES_DIR / bird.name, root, line.where)
        n_clipped += clipped != box
        boxes.append(clipped)
    if n_clipped:
        report.note(f"{n_clipped:,} box(es) reach beyond their image and were clipped to it")
    return boxes


def _split_of(bird: Bird, protocol: str) -> str:
    if protocol == "zero_shot":
        return TRAIN if bird.class_id <= ZERO_SHOT_TRAIN_LAST_CLASS else VALIDATION
    return TRAIN if bird.is_training else VALIDATION


def _build_frame(
    birds: list[Bird], boxes: list[Box] | None, names: dict[int, str], protocol: str, base: Path, root: Path
) -> pd.DataFrame:
    rows = []
    for i, bird in enumerate(birds):
        split = _split_of(bird, protocol)
        flag = None if split == TRAIN else True
        row = {
            LABELS_COLUMN: bird.class_id,
            PATHS_COLUMN: rel_posix(base / IMAGES_DIR / bird.name, root),
            SPLIT_COLUMN: split,
            IS_QUERY_COLUMN: flag,
            IS_GALLERY_COLUMN: flag,
            CLASS_NAME_COLUMN: names[bird.class_id],
        }
        if boxes is not None:
            row.update(dict(zip(BOX_COLUMNS, boxes[i])))
        rows.append(row)
    df = make_rows_frame(rows, COLUMNS + (BOX_COLUMNS if boxes is not None else []))
    # train rows first, then validation; image_id order within each
    return df.sort_values(SPLIT_COLUMN, kind="stable", ignore_index=True)


def convert_cub200(
    root: Path | str,
    *,
    protocol: str = "zero_shot",
    bboxes: bool = True,
    strict: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    if protocol not in PROTOCOLS:
        raise ConversionError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    root = Path(root)
    base = find_cub_base(root)
    report = ConversionReport(f"CUB-200-2011 ({protocol} protocol)", label_noun="classes")
    names = load_class_names(base / CLASSES_FILE, root)
    birds = load_birds(base, root)
    unnamed = sorted({b.class_id for b in birds} - names.keys())
    if unnamed:
        where = next(b.where for b in birds if b.class_id == unnamed[0])
        raise ConversionError(f"class {unnamed[0]} (image at {where}) is not in {CLASSES_FILE}")
    check_listed_images([(base / IMAGES_DIR / b.name, b.where) for b in birds], root, report)
    boxes = load_boxes(base / BOXES_FILE, root, birds, base, report) if bboxes else None
    df = _build_frame(birds, boxes, names, protocol, base, root)
    is_train = df[SPLIT_COLUMN] == TRAIN
    actual = {
        "images": len(df),
        "classes": df[LABELS_COLUMN].nunique(),
        "train images": int(is_train.sum()),
        "train classes": df.loc[is_train, LABELS_COLUMN].nunique(),
        "validation images": int((~is_train).sum()),
        "validation classes": df.loc[~is_train, LABELS_COLUMN].nunique(),
    }
    expected = PUBLISHED_COUNTS[protocol] if expected_counts is None else expected_counts
    check_expected_counts(actual, expected, strict=strict, report=report, what=f"CUB-200-2011 {protocol}-protocol")
    read = [IMAGES_FILE, LABELS_FILE, SPLIT_FILE, CLASSES_FILE] + ([BOXES_FILE] if bboxes else [])
    report.note(f"read {', '.join(rel_posix(base / f, root) for f in read)}")
    used = set(read) | {IMAGES_DIR, DEFAULT_CSV_NAME}
    unused = sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if p.name not in used)
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(df, report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("CUB-200-2011 -> OML dataset.csv.")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="zero_shot",
        help="zero_shot: classes 1-100 train / 101-200 validation (default); closed: the official image split",
    )
    parser.add_argument("--no-bboxes", action="store_true", help="leave out the x_1, y_1, x_2, y_2 columns")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        lambda a: convert_cub200(a.root, protocol=a.protocol, bboxes=not a.no_bboxes, strict=a.strict),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
