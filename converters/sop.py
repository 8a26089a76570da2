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

This module also holds the list-file pieces the other list-driven converters (InShop, CUB-200-2011,
MSMT17) share: :func:`read_list_lines`, :func:`parse_int`, :func:`check_listed_images` and
:func:`clip_box_to_image`.
"""
from __future__ import annotations

import argparse
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from PIL import Image

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
    scan_image_files,
)
from metriclab.core.constants import (
    CATEGORIES_COLUMN,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SPLIT_COLUMN,
)
from metriclab.data.contract import outside_root

# ------------------------------------------------------------------------------ list files (shared)

UNLISTED_REASON = "images in no list file ignored"
Box = tuple[int, int, int, int]  # x_1, y_1, x_2, y_2


@dataclass(frozen=True)
class ListLine:
    where: str  # "<file relative to the root> line <n>", for messages
    fields: list[str]


def read_list_lines(
    path: Path,
    root: Path,
    n_fields: int,
    *,
    header: str | None = None,
    count_line: bool = False,
    report: ConversionReport | None = None,
) -> list[ListLine]:
    """The lines of a whitespace-separated list file, each split into exactly ``n_fields`` fields.

    ``count_line``: line 1 holds the number of entries (a different number of lines is a warning);
    ``header``: the next line must be these column names. Blank lines are skipped; any other malformed
    line is a ConversionError naming the file and the line."""
    rel = rel_posix(path, root)
    if not path.is_file():
        raise ConversionError(f"{rel} is missing")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConversionError(f"{rel}: not UTF-8 text ({e})") from e
    lines = text.splitlines()
    position, declared = 0, None
    if count_line:
        first = lines[0].strip() if lines else ""
        if not first.isdigit():
            raise ConversionError(f"{rel} line 1: expected the number of entries, found {first!r}")
        declared, position = int(first), 1
    if header is not None:
        found = " ".join(lines[position].split()) if position < len(lines) else ""
        if found != header:
            raise ConversionError(f"{rel} line {position + 1}: expected the header {header!r}, found {found!r}")
        position += 1
    result = []
    for number, line in enumerate(lines[position:], start=position + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != n_fields:
            raise ConversionError(f"{rel} line {number}: expected {n_fields} fields, found {len(fields)}: {line!r}")
        result.append(ListLine(f"{rel} line {number}", fields))
    if not result:
        raise ConversionError(f"{rel} lists nothing")
    if declared is not None and declared != len(result) and report is not None:
        report.warn(f"{rel} line 1 says {declared:,} entries, the file lists {len(result):,}")
    return result


def parse_int(text: str, where: str, what: str, low: int | None = None, high: int | None = None) -> int:
    """An integer field of a list line (optionally within low..high); the error names the line and the field."""
    try:
        value = int(text)
    except ValueError:
        raise ConversionError(f"{where}: {what} must be an integer, found {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '...'}..{high if high is not None else '...'}"
        raise ConversionError(f"{where}: {what} {value} outside {bounds}")
    return value


def check_relative_path(text: str, where: str) -> str:
    """A listed image path: relative, forward slashes, inside the dataset folder."""
    if outside_root(text) or "\\" in text:
        raise ConversionError(f"{where}: {text!r} is not a path inside the dataset folder")
    return text


def check_listed_images(listed: Sequence[tuple[Path, str]], root: Path, report: ConversionReport) -> None:
    """Every listed image (path, where it is listed) exists; images in the same folders that no list names
    are reported as skipped. Each folder is listed once, so a file costs no extra stat."""
    by_folder: dict[Path, set[str]] = defaultdict(set)
    for path, _ in listed:
        by_folder[path.parent].add(path.name)
    present: dict[Path, set[str]] = {}
    for folder, names in sorted(by_folder.items()):
        if not folder.is_dir():
            present[folder] = set()
            continue
        images = scan_image_files(folder, root, report)
        present[folder] = {entry.name for entry, _ in images if entry.is_file()}
        for entry, rel in images:
            if entry.name not in names:
                report.skip(UNLISTED_REASON, rel)
    missing = [
        f"{where}: {rel_posix(path, root)}"
        for path, where in listed
        if path.name not in present[path.parent] and not path.is_file()
    ]
    if missing:
        raise ConversionError(f"{len(missing):,} listed image(s) missing: {list_some(missing)}")


def clip_box_to_image(box: Box, image: Path, root: Path, where: str) -> Box:
    """``box`` (x_1, y_1, x_2, y_2, listed at ``where``) cut to the image's size, read from its header; a box
    with nothing left inside the image is an error naming the line."""
    try:
        with Image.open(image) as opened:  # reads the header only
            width, height = opened.size
    except Exception as e:  # PIL raises several types for non-images
        raise ConversionError(f"{rel_posix(image, root)}: cannot open it ({e})") from e
    x1, y1, x2, y2 = box
    clipped = (x1, y1, min(x2, width), min(y2, height))
    if not (0 <= clipped[0] < clipped[2] and 0 <= clipped[1] < clipped[3]):
        raise ConversionError(
            f"{where}: box x_1={x1}, y_1={y1}, x_2={x2}, y_2={y2} lies outside the {width}x{height} image "
            f"{rel_posix(image, root)}. Fix the line or pass --no-bboxes."
        )
    return clipped


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
