"""Stanford Online Products (SOP) folder -> OML CSV with the standard metric-learning protocol.

Song et al. (CVPR 2016): ``Ebay_train.txt`` lists the 59,551 train images of 11,318 products (class ids
1-11,318), ``Ebay_test.txt`` the 60,502 test images of the other 11,316 (ids 11,319-22,634). The test
images are validation rows that are both query and gallery: each one queries all the others
(leave-one-out Recall@K). Labels are the products' ``class_id``; ``category`` is the super-class, named
after its folder without ``_final`` (``bicycle_final/`` -> ``bicycle``, 12 in all).

Both list files start with the header ``image_id class_id super_class_id path`` and hold one image a line,
fields separated by spaces; ``path`` is relative to the dataset folder, e.g.
``bicycle_final/111085122871_0.JPG`` (upper-case extension). Rows are keyed by ``path``, not ``image_id``.
A malformed line is an error naming the file and the line.

Layouts: the archive's own ``Stanford_Online_Products/`` folder, or its contents.

    python converters/sop.py ROOT [--out CSV] [--strict]
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from converters.common import (
    DEFAULT_CSV_NAME,
    TRAIN,
    VALIDATION,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    list_some,
    make_rows_frame,
    rel_posix,
    run_cli,
)
from converters.listfiles import check_listed_images, check_relative_path, parse_int, read_list_lines
from metriclab.core.constants import (
    CATEGORIES_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SPLIT_COLUMN,
)

# ------------------------------------------------------------------------------------------------ SOP

TRAIN_LIST, TEST_LIST = "Ebay_train.txt", "Ebay_test.txt"
HEADER = "image_id class_id super_class_id path"
ROOT_CANDIDATES = (".", "Stanford_Online_Products")
FOLDER_SUFFIX = "_final"
N_SUPER_CLASSES = 12

PUBLISHED_COUNTS: Mapping[str, int] = {
    "train images": 59_551,
    "train classes": 11_318,
    "test images": 60_502,
    "test classes": 11_316,
    "super-classes": N_SUPER_CLASSES,
}

COLUMNS = [LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN, CATEGORIES_COLUMN]


@dataclass(frozen=True)
class Product:
    rel: str  # relative to the dataset root
    class_id: int
    category: str
    where: str


def find_sop_base(root: Path) -> Path:
    for candidate in ROOT_CANDIDATES:
        if (root / candidate / TRAIN_LIST).is_file():
            return root / candidate
    raise ConversionError(
        f"SOP: {TRAIN_LIST} not found in {root} or {root / 'Stanford_Online_Products'}. "
        f"Pass the folder that holds {TRAIN_LIST}, {TEST_LIST} and the <category>_final/ folders."
    )


def _read_products(path: Path, base: Path, root: Path, category_of: dict[int, tuple[str, str]]) -> list[Product]:
    """One Product per line; ``category_of`` (super_class_id -> folder, first line) checks that the super-class
    ids and the folders agree across both files."""
    products = []
    for line in read_list_lines(path, root, 4, header=HEADER):
        parse_int(line.fields[0], line.where, "image_id", low=1)
        class_id = parse_int(line.fields[1], line.where, "class_id", low=1)
        super_id = parse_int(line.fields[2], line.where, "super_class_id", low=1, high=N_SUPER_CLASSES)
        listed = check_relative_path(line.fields[3], line.where)
        folder = listed.split("/", 1)[0]
        if "/" not in listed or not folder.endswith(FOLDER_SUFFIX):
            raise ConversionError(f"{line.where}: path {listed!r} is not in a <category>{FOLDER_SUFFIX}/ folder")
        known = category_of.setdefault(super_id, (folder, line.where))
        if known[0] != folder:
            raise ConversionError(
                f"{line.where}: super_class_id {super_id} is {folder}/ here but {known[0]}/ at {known[1]}"
            )
        other = next(((i, w) for i, (f, w) in category_of.items() if f == folder and i != super_id), None)
        if other is not None:
            raise ConversionError(
                f"{line.where}: {folder}/ is super_class_id {super_id} here but {other[0]} at {other[1]}"
            )
        products.append(Product(rel_posix(base / listed, root), class_id, folder[: -len(FOLDER_SUFFIX)], line.where))
    return products


def _check_classes(train: list[Product], test: list[Product]) -> None:
    """Paths are listed once; each class lies in one super-class and in one of the two files."""
    first: dict[str, str] = {}
    class_home: dict[int, Product] = {}
    for p in train + test:
        if p.rel in first:
            raise ConversionError(f"{p.where}: {p.rel} is already listed at {first[p.rel]}")
        first[p.rel] = p.where
        home = class_home.setdefault(p.class_id, p)
        if home.category != p.category:
            raise ConversionError(
                f"{p.where}: class_id {p.class_id} is in {p.category} here but in {home.category} at {home.where}"
            )
    shared = sorted({p.class_id for p in train} & {p.class_id for p in test})
    if shared:
        where = next(p.where for p in test if p.class_id == shared[0])
        raise ConversionError(
            f"class_id(s) in both {TRAIN_LIST} and {TEST_LIST}: {list_some(shared)} (first in the test list at "
            f"{where}); the protocol needs disjoint classes"
        )


def _build_rows(train: list[Product], test: list[Product]) -> list[dict]:
    rows = []
    for products, split, flag in ((train, TRAIN, None), (test, VALIDATION, True)):
        for p in products:
            rows.append(
                {
                    LABELS_COLUMN: p.class_id,
                    PATHS_COLUMN: p.rel,
                    SPLIT_COLUMN: split,
                    IS_QUERY_COLUMN: flag,
                    IS_GALLERY_COLUMN: flag,
                    CATEGORIES_COLUMN: p.category,
                }
            )
    return rows


def convert_sop(
    root: Path | str, *, strict: bool = False, expected_counts: Mapping[str, int] | None = None
) -> Conversion:
    root = Path(root)
    base = find_sop_base(root)
    report = ConversionReport("Stanford Online Products", label_noun="classes")
    category_of: dict[int, tuple[str, str]] = {}
    train = _read_products(base / TRAIN_LIST, base, root, category_of)
    test = _read_products(base / TEST_LIST, base, root, category_of)
    _check_classes(train, test)
    check_listed_images([(root / p.rel, p.where) for p in train + test], root, report)
    per_class: dict[int, int] = defaultdict(int)
    for p in test:
        per_class[p.class_id] += 1
    singletons = sorted(c for c, n in per_class.items() if n == 1)
    if singletons:
        report.warn(
            f"{len(singletons):,} test class(es) have a single image, so their query has no positive: "
            f"{list_some(singletons)}"
        )
    actual = {
        "train images": len(train),
        "train classes": len({p.class_id for p in train}),
        "test images": len(test),
        "test classes": len(per_class),
        "super-classes": len(category_of),
    }
    expected = PUBLISHED_COUNTS if expected_counts is None else expected_counts
    check_expected_counts(actual, expected, strict=strict, report=report, what="SOP")
    report.note(f"read {rel_posix(base / TRAIN_LIST, root)} and {rel_posix(base / TEST_LIST, root)}")
    folders = {p.rel.rsplit("/", 2)[-2] for p in train + test}
    unused = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in base.iterdir()
        if p.name not in folders | {TRAIN_LIST, TEST_LIST, DEFAULT_CSV_NAME} and not p.name.startswith(".")
    )
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(make_rows_frame(_build_rows(train, test), COLUMNS), report, root)


def build_parser() -> argparse.ArgumentParser:
    return base_parser(
        "Stanford Online Products -> OML dataset.csv (11,318 train / 11,316 test classes, every test image "
        "query and gallery)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), lambda a: convert_sop(a.root, strict=a.strict), argv)


if __name__ == "__main__":
    raise SystemExit(main())
