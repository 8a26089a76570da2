"""Fruit & vegetable folders (Kaggle, 36 classes), or any ImageFolder tree, -> OML CSV.

ROOT holds train/, validation/ and test/, one sub-folder per class. One label map (sorted class names,
as torchvision's ImageFolder) serves every split.

``--protocol closed`` (default): kNN classification. Train rows from train/; queries from validation/
(or test/ with ``--query test``); the gallery is the train images again, as validation rows.
``--protocol open``: the images of train/ and the query folder pooled; the first half of the classes (in
label order) train, the other half validation, every validation image both query and gallery.

Every image is read once: undecodable and empty files are skipped and listed (an error with --strict);
exact duplicates (same bytes) across folders are reported, since they inflate scores.

    python converters/fruits.py ROOT [--protocol closed|open] [--query validation|test] [--out CSV] [--strict]
"""
from __future__ import annotations

import argparse
import os
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from converters.common import (
    NON_IMAGE_REASON,
    TRAIN,
    VALIDATION,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    inspect_image,
    is_image_name,
    list_some,
    make_rows_frame,
    rel_posix,
    require_dirs,
    run_cli,
)
from metriclab.core.constants import (
    CLASS_NAME_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SPLIT_COLUMN,
)
from metriclab.core.progress import progress

TRAIN_DIR = "train"
SPLIT_DIRS = ("train", "validation", "test")
QUERY_DIRS = ("validation", "test")
PROTOCOLS = ("closed", "open")
BAD_IMAGE_REASON = "undecodable or empty images skipped"
MODE_NAMES = {"L": "grayscale", "LA": "grayscale+alpha", "P": "palette", "CMYK": "CMYK", "I;16": "16-bit"}


@dataclass(frozen=True)
class FruitImage:
    rel: str
    folder: str
    class_name: str
    sha1: str


def list_class_dirs(split_dir: Path) -> list[str]:
    """Immediate non-hidden sub-folders, sorted as ImageFolder sorts them."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))


def _collect_files(split_dir: Path, root: Path, report: ConversionReport) -> dict[str, list[Path]]:
    """class name -> image files (recursively, like ImageFolder); other files are reported and ignored."""
    files_by_class: dict[str, list[Path]] = {}
    loose_images = []
    for entry in sorted(os.scandir(split_dir), key=lambda e: e.name):
        rel = rel_posix(Path(entry.path), root)
        if entry.name.startswith("."):
            report.skip("hidden files and folders ignored", rel)
        elif entry.is_dir():
            files_by_class[entry.name] = []
            for folder, dir_names, file_names in os.walk(entry.path):
                dir_names[:] = sorted(d for d in dir_names if not d.startswith("."))
                for name in sorted(file_names):
                    path = Path(folder) / name
                    if is_image_name(name):
                        files_by_class[entry.name].append(path)
                    else:
                        report.skip(NON_IMAGE_REASON, rel_posix(path, root))
        elif is_image_name(entry.name):
            loose_images.append(rel)
        else:
            report.skip(NON_IMAGE_REASON, rel)
    if loose_images:
        raise ConversionError(
            f"image(s) directly in {split_dir.name}/ have no class folder: {list_some(loose_images)}. "
            f"Move each into {split_dir.name}/<class name>/."
        )
    if not files_by_class:
        raise ConversionError(f"{split_dir} has no class folders (expected {split_dir.name}/<class name>/<image>)")
    return files_by_class


def _check_class_sets(root: Path, query_dir: str, protocol: str, strict: bool, report: ConversionReport) -> list[str]:
    """The union of class folders over the split folders present; differences are reported."""
    present = [d for d in SPLIT_DIRS if (root / d).is_dir()]
    classes = {d: set(list_class_dirs(root / d)) for d in present}
    union = sorted(set().union(*classes.values()))
    no_gallery = sorted(classes[query_dir] - classes[TRAIN_DIR])
    if protocol == "closed" and no_gallery:
        raise ConversionError(
            f"class folder(s) in {query_dir}/ without a {TRAIN_DIR}/ folder, so their queries have no gallery "
            f"image in the closed protocol: {list_some(no_gallery)}"
        )
    for d in present:
        absent = sorted(set(union) - classes[d])
        if absent:
            message = f"{d}/ lacks class folder(s) present elsewhere: {list_some(absent)}"
            if strict:
                raise ConversionError(message)
            report.warn(message)
    return union


def _inspect(
    files_by_class: dict[str, list[Path]],
    folder: str,
    root: Path,
    report: ConversionReport,
    bad: list[str],
    modes: Counter,
    mislabelled: list[str],
) -> list[FruitImage]:
    """The folder's usable images; unusable files, image modes and mislabelled files go into the accumulators."""
    images = []
    # every image is opened (format, mode, hash): the slow part of a conversion, hence the bar
    for class_name, paths in progress(list(files_by_class.items()), f"reading {folder} images", unit="class"):
        if not paths:
            report.warn(f"{folder}/{class_name}/ holds no images")
        for path in paths:
            rel = rel_posix(path, root)
            try:
                info = inspect_image(path)
            except (ValueError, OSError) as e:
                bad.append(f"{rel} ({e})")
                continue
            modes[info.mode] += 1
            if not info.extension_matches:
                mislabelled.append(f"{rel} ({info.format})")
            images.append(FruitImage(rel, folder, class_name, info.sha1))
    return images


def _report_duplicates(images: list[FruitImage], report: ConversionReport) -> None:
    by_hash = defaultdict(list)
    for image in images:
        by_hash[image.sha1].append(image)
    groups = [g for g in by_hash.values() if len(g) > 1]
    across = [g for g in groups if len({i.folder for i in g}) > 1]
    within = [g for g in groups if len({i.folder for i in g}) == 1]
    if across:
        examples = [" = ".join(i.rel for i in g) for g in across[:3]]
        report.warn(
            f"{len(across):,} group(s) of byte-identical images span more than one folder "
            f"({sum(len(g) for g in across):,} files); they inflate scores. E.g. {'; '.join(examples)}"
        )
    if within:
        report.note(
            f"{len(within):,} group(s) of byte-identical images inside one folder "
            f"({sum(len(g) for g in within):,} files), "
            f"e.g. {' = '.join(i.rel for i in within[0])}"
        )


def _read_folders(
    root: Path, folders: tuple[str, str], strict: bool, report: ConversionReport
) -> tuple[dict[str, list[FruitImage]], Counter, list[str]]:
    """Each folder's usable images, the image modes seen and the mislabelled files; unusable images are skipped
    (an error with ``strict``)."""
    bad: list[str] = []
    modes: Counter = Counter()
    mislabelled: list[str] = []
    images_by_folder = {}
    for folder in folders:
        files_by_class = _collect_files(root / folder, root, report)
        images_by_folder[folder] = _inspect(files_by_class, folder, root, report, bad, modes, mislabelled)
    if bad and strict:
        raise ConversionError(f"{len(bad):,} image(s) cannot be used: {list_some(bad)}. Remove or replace them.")
    for item in bad:
        report.skip(BAD_IMAGE_REASON, item)
    return images_by_folder, modes, mislabelled


def _note_contents(
    root: Path,
    query: str,
    label_of: dict[str, int],
    modes: Counter,
    mislabelled: list[str],
    report: ConversionReport,
) -> None:
    """Notes on what was read: folders left unread, the label map, non-RGB images, mislabelled files."""
    unused = [d for d in SPLIT_DIRS if d not in (TRAIN_DIR, query) and (root / d).is_dir()]
    if unused:
        report.note(f"not read: {', '.join(d + '/' for d in unused)}")
    report.note("label map: " + ", ".join(f"{label}={name}" for name, label in label_of.items()))
    odd_modes = {m: n for m, n in sorted(modes.items()) if m != "RGB"}
    if odd_modes:
        report.note(
            "accepted non-RGB images (OML converts them to RGB): "
            + ", ".join(f"{n:,} {MODE_NAMES.get(m, m)}" for m, n in odd_modes.items())
        )
    if mislabelled:
        report.note(
            f"{len(mislabelled):,} file(s) whose content differs from the extension, accepted: "
            + list_some(mislabelled, 5)
        )


def _row(label: int, image: FruitImage, split: str, is_query: bool | None, is_gallery: bool | None) -> dict:
    return {
        LABELS_COLUMN: label,
        PATHS_COLUMN: image.rel,
        SPLIT_COLUMN: split,
        IS_QUERY_COLUMN: is_query,
        IS_GALLERY_COLUMN: is_gallery,
        CLASS_NAME_COLUMN: image.class_name,
    }


def _closed_rows(
    train_images: list[FruitImage], query_images: list[FruitImage], label_of: dict[str, int]
) -> list[dict]:
    """Train rows; validation queries from the query folder, against the train images as the gallery."""
    rows = [_row(label_of[i.class_name], i, TRAIN, None, None) for i in train_images]
    rows += [_row(label_of[i.class_name], i, VALIDATION, True, False) for i in query_images]
    # The train images again, as the gallery.
    rows += [_row(label_of[i.class_name], i, VALIDATION, False, True) for i in train_images]
    return rows


def _open_rows(images: list[FruitImage], label_of: dict[str, int], report: ConversionReport) -> list[dict]:
    """The first half of the labels train; the rest validation, each image both query and gallery."""
    n_classes = len(label_of)
    n_train_classes = n_classes // 2
    if n_train_classes == 0:
        raise ConversionError("the open protocol needs at least two classes")
    rows = []
    for image in images:
        label = label_of[image.class_name]
        if label < n_train_classes:
            rows.append(_row(label, image, TRAIN, None, None))
        else:
            rows.append(_row(label, image, VALIDATION, True, True))
    report.note(f"open protocol: labels 0-{n_train_classes - 1} train, {n_train_classes}-{n_classes - 1} validation")
    return rows


def convert_fruits(
    root: Path | str,
    *,
    protocol: str = "closed",
    query: str = "validation",
    strict: bool = False,
) -> Conversion:
    if protocol not in PROTOCOLS:
        raise ConversionError(f"unknown protocol {protocol!r}; use one of {PROTOCOLS}")
    if query not in QUERY_DIRS:
        raise ConversionError(f"unknown query folder {query!r}; use one of {QUERY_DIRS}")
    root = Path(root)
    require_dirs(root, (TRAIN_DIR, query), "fruits")
    report = ConversionReport(f"fruits ({protocol} protocol, queries from {query}/)", label_noun="classes")
    class_names = _check_class_sets(root, query, protocol, strict, report)
    label_of = {name: label for label, name in enumerate(class_names)}
    images_by_folder, modes, mislabelled = _read_folders(root, (TRAIN_DIR, query), strict, report)
    _note_contents(root, query, label_of, modes, mislabelled, report)
    train_images, query_images = images_by_folder[TRAIN_DIR], images_by_folder[query]
    _report_duplicates(train_images + query_images, report)
    if protocol == "closed":
        rows = _closed_rows(train_images, query_images, label_of)
    else:
        rows = _open_rows(train_images + query_images, label_of, report)
    columns = [LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN, CLASS_NAME_COLUMN]
    return Conversion(make_rows_frame(rows, columns), report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Fruit & vegetable (or any train/validation/test ImageFolder) tree -> OML dataset.csv.")
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="closed",
        help="closed: kNN classification against the train images (default); open: half the classes held out",
    )
    parser.add_argument("--query", choices=QUERY_DIRS, default="validation", help="held-out folder used for queries")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(), lambda a: convert_fruits(a.root, protocol=a.protocol, query=a.query, strict=a.strict), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
