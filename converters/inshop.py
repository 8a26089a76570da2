"""DeepFashion In-shop Clothes Retrieval (InShop) folder -> OML CSV with the official query and gallery lists.

``Eval/list_eval_partition.txt`` assigns each of the 52,712 images to ``train`` (25,882 images of 3,997
items), ``query`` (14,218) or ``gallery`` (12,612), the last two of the same 3,985 items; the queries are
ranked against the gallery (Recall@K), nothing excluded. Labels are the item numbers (``id_00000182`` ->
182); ``category`` is gender and clothes type from the image's folders (``img/MEN/Denim/...`` ->
``MEN/Denim``).

Boxes (on by default, ``--no-bboxes`` leaves them out) come from ``Anno/list_bbox_inshop.txt``,
columns ``image_name clothes_type pose_type x_1 y_1 x_2 y_2``: upper-left and lower-right corners in the
frame of the 256x256 ``img/`` images. A box reaching beyond its image is clipped to it (and counted);
the high-resolution ``img_highres/`` set is not used, since the boxes are not in its frame.

Both list files start with the number of entries (line 1) and a header (line 2); fields are separated by
whitespace. A malformed line is an error naming the file and the line.

Layouts: the release (``Img/img/``, ``Anno/``, ``Eval/``, from unpacking ``Img/img.zip`` in place, optionally
inside ``In-shop Clothes Retrieval Benchmark/``), or everything at the top (``img/`` and both list files
next to it, as OML expects).

    python converters/inshop.py ROOT [--no-bboxes] [--out CSV] [--strict]
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from converters.common import (
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
from converters.listfiles import (
    Box,
    check_listed_images,
    check_relative_path,
    clip_box_to_image,
    parse_int,
    read_list_lines,
)
from metriclab.core.constants import (
    CATEGORIES_COLUMN,
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

PARTITION_FILE, BBOX_FILE = "list_eval_partition.txt", "list_bbox_inshop.txt"
PARTITION_HEADER = "image_name item_id evaluation_status"
BBOX_HEADER = "image_name clothes_type pose_type x_1 y_1 x_2 y_2"
ROOT_CANDIDATES = (".", "In-shop Clothes Retrieval Benchmark")
PARTITION_DIRS, BBOX_DIRS, IMAGE_DIRS = ("Eval", "."), ("Anno", "."), ("Img", ".")
STATUSES = ("train", "query", "gallery")
# img/<MEN|WOMEN>/<Category>/id_XXXXXXXX/<NN>_<k>_<view>.jpg
IMAGE_NAME = re.compile(r"^img/(?P<gender>MEN|WOMEN)/(?P<category>[^/]+)/(?P<item>id_\d{8})/[^/]+$")
ITEM_ID = re.compile(r"^id_(\d{8})$")
CLIPPED_NOTE = "box(es) reach beyond their image and were clipped to it"

PUBLISHED_COUNTS: Mapping[str, int] = {
    "images": 52_712,
    "items": 7_982,
    "train images": 25_882,
    "train items": 3_997,
    "query images": 14_218,
    "query items": 3_985,
    "gallery images": 12_612,
    "gallery items": 3_985,
}

BOX_COLUMNS = [X1_COLUMN, Y1_COLUMN, X2_COLUMN, Y2_COLUMN]
COLUMNS = [LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN, CATEGORIES_COLUMN]


@dataclass(frozen=True)
class InShopLayout:
    base: Path
    partition: Path
    bboxes: Path | None
    images: Path  # the folder that holds img/; list paths are relative to it


@dataclass(frozen=True)
class Entry:
    name: str  # as listed: img/MEN/Denim/id_00000182/01_1_front.jpg
    item: int
    status: str
    category: str
    where: str


def _first_file(base: Path, folders: Sequence[str], name: str) -> Path | None:
    return next((base / f / name for f in folders if (base / f / name).is_file()), None)


def find_inshop_layout(root: Path, bboxes: bool) -> InShopLayout:
    for candidate in ROOT_CANDIDATES:
        base = root / candidate
        partition = _first_file(base, PARTITION_DIRS, PARTITION_FILE)
        if partition is None:
            continue
        images = next((base / d for d in IMAGE_DIRS if (base / d / "img").is_dir()), None)
        if images is None:
            raise ConversionError(
                f"InShop: no img/ folder in {base / 'Img'} or {base}: unpack Img/img.zip where it lies"
            )
        box_file = _first_file(base, BBOX_DIRS, BBOX_FILE)
        if bboxes and box_file is None:
            raise ConversionError(f"InShop: {BBOX_FILE} not found in {base / 'Anno'} or {base}; or pass --no-bboxes")
        return InShopLayout(base, partition, box_file if bboxes else None, images)
    raise ConversionError(
        f"InShop: {PARTITION_FILE} not found in Eval/ or the top of {root} (or its 'In-shop Clothes Retrieval "
        f"Benchmark/'). Pass the folder that holds Eval/, Anno/ and Img/."
    )


def _read_partition(path: Path, root: Path, report: ConversionReport) -> list[Entry]:
    entries, seen = [], {}
    for line in read_list_lines(path, root, 3, header=PARTITION_HEADER, count_line=True, report=report):
        name, item_text, status = line.fields
        check_relative_path(name, line.where)
        item = ITEM_ID.match(item_text)
        if item is None:
            raise ConversionError(f"{line.where}: item_id must look like id_00000182, found {item_text!r}")
        if status not in STATUSES:
            raise ConversionError(f"{line.where}: evaluation_status must be one of {STATUSES}, found {status!r}")
        match = IMAGE_NAME.match(name)
        if match is None:
            raise ConversionError(
                f"{line.where}: image_name {name!r} does not follow img/<MEN|WOMEN>/<category>/id_XXXXXXXX/<file>"
            )
        if match["item"] != item_text:
            raise ConversionError(f"{line.where}: {name} lies in {match['item']}/ but is listed as {item_text}")
        if name in seen:
            raise ConversionError(f"{line.where}: {name} is already listed at {seen[name]}")
        seen[name] = line.where
        category = f"{match['gender']}/{match['category']}"
        entries.append(Entry(name, int(item[1]), status, category, line.where))
    return entries


def _check_items(entries: list[Entry]) -> None:
    """Train and test items are disjoint, every query item has a gallery image, an item has one category."""
    items = {status: {e.item for e in entries if e.status == status} for status in STATUSES}
    shared = sorted(items["train"] & (items["query"] | items["gallery"]))
    if shared:
        where = next(e.where for e in entries if e.item == shared[0] and e.status != "train")
        raise ConversionError(
            f"item(s) both in train and in query/gallery: {list_some(shared)} (e.g. {where}); the protocol needs "
            f"disjoint items"
        )
    orphans = sorted(items["query"] - items["gallery"])
    if orphans:
        where = next(e.where for e in entries if e.item == orphans[0])
        raise ConversionError(f"query item(s) with no gallery image: {list_some(orphans)} (e.g. {where})")
    home: dict[int, Entry] = {}
    for e in entries:
        first = home.setdefault(e.item, e)
        if first.category != e.category:
            raise ConversionError(
                f"{e.where}: item {e.item} is in {e.category} here but in {first.category} at {first.where}"
            )


def _read_boxes(path: Path, root: Path, report: ConversionReport) -> dict[str, tuple[Box, str]]:
    """image_name -> ((x_1, y_1, x_2, y_2), where); a box must have x_1 < x_2, y_1 < y_2, no negative corner."""
    boxes: dict[str, tuple[Box, str]] = {}
    for line in read_list_lines(path, root, 7, header=BBOX_HEADER, count_line=True, report=report):
        name = line.fields[0]
        parse_int(line.fields[1], line.where, "clothes_type", low=1, high=3)
        parse_int(line.fields[2], line.where, "pose_type", low=1, high=6)
        x1, y1, x2, y2 = (parse_int(v, line.where, c, low=0) for v, c in zip(line.fields[3:], BOX_COLUMNS))
        if not (x1 < x2 and y1 < y2):
            raise ConversionError(
                f"{line.where}: box x_1={x1}, y_1={y1}, x_2={x2}, y_2={y2} needs x_1 < x_2 and y_1 < y_2"
            )
        if name in boxes:
            raise ConversionError(f"{line.where}: {name} already has a box at {boxes[name][1]}")
        boxes[name] = ((x1, y1, x2, y2), line.where)
    return boxes


def _boxes_for(
    entries: list[Entry], boxes: dict[str, tuple[Box, str]], images: Path, root: Path,
    report: ConversionReport,
) -> list[Box]:
    """Each entry's box, clipped to its image (read from the header); a box outside its image is an error."""
    without = [f"{e.name} ({e.where})" for e in entries if e.name not in boxes]
    if without:
        raise ConversionError(
            f"{len(without):,} image(s) have no line in {BBOX_FILE}: {list_some(without)}. Pass --no-bboxes to "
            f"convert without boxes."
        )
    result, n_clipped = [], 0
    for e in entries:
        box, where = boxes[e.name]
        clipped = clip_box_to_image(box, images / e.name, root, where)
        n_clipped += clipped != box
        result.append(clipped)
    if n_clipped:
        report.note(f"{n_clipped:,} {CLIPPED_NOTE}")
    n_unused = len(boxes.keys() - {e.name for e in entries})
    if n_unused:
        report.note(f"{n_unused:,} line(s) of {BBOX_FILE} name images not in {PARTITION_FILE}: not used")
    return result


def _build_rows(entries: list[Entry], boxes: list[Box] | None, images: Path, root: Path) -> list[dict]:
    roles = {"train": (TRAIN, None, None), "query": (VALIDATION, True, False), "gallery": (VALIDATION, False, True)}
    rows = []
    for status in STATUSES:  # train rows first, then the queries, then the gallery; file order within
        for i, e in enumerate(entries):
            if e.status != status:
                continue
            split, is_query, is_gallery = roles[status]
            row = {
                LABELS_COLUMN: e.item,
                PATHS_COLUMN: rel_posix(images / e.name, root),
                SPLIT_COLUMN: split,
                IS_QUERY_COLUMN: is_query,
                IS_GALLERY_COLUMN: is_gallery,
                CATEGORIES_COLUMN: e.category,
            }
            if boxes is not None:
                row.update(dict(zip(BOX_COLUMNS, boxes[i])))
            rows.append(row)
    return rows


def convert_inshop(
    root: Path | str,
    *,
    bboxes: bool = True,
    strict: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    root = Path(root)
    layout = find_inshop_layout(root, bboxes)
    report = ConversionReport("InShop (official query/gallery lists)", label_noun="items")
    entries = _read_partition(layout.partition, root, report)
    _check_items(entries)
    check_listed_images([(layout.images / e.name, e.where) for e in entries], root, report)
    boxes = None
    if layout.bboxes is not None:
        boxes = _boxes_for(entries, _read_boxes(layout.bboxes, root, report), layout.images, root, report)
    by_status = {s: [e for e in entries if e.status == s] for s in STATUSES}
    actual = {"images": len(entries), "items": len({e.item for e in entries})}
    for status, part in by_status.items():
        actual[f"{status} images"] = len(part)
        actual[f"{status} items"] = len({e.item for e in part})
    expected = PUBLISHED_COUNTS if expected_counts is None else expected_counts
    check_expected_counts(actual, expected, strict=strict, report=report, what="InShop")
    read = [layout.partition] + ([layout.bboxes] if layout.bboxes is not None else [])
    images_rel = rel_posix(layout.images / "img", root)
    report.note(f"read {', '.join(rel_posix(p, root) for p in read)}; images in {images_rel}/")
    counts: dict[int, int] = {}
    for e in by_status["train"]:
        counts[e.item] = counts.get(e.item, 0) + 1
    single = sum(n == 1 for n in counts.values())
    if single:
        report.note(f"{single:,} train item(s) have a single image (kept)")
    columns = COLUMNS + (BOX_COLUMNS if boxes is not None else [])
    return Conversion(make_rows_frame(_build_rows(entries, boxes, layout.images, root), columns), report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("DeepFashion In-shop Clothes Retrieval -> OML dataset.csv (official query/gallery lists).")
    parser.add_argument("--no-bboxes", action="store_true", help="leave out the x_1, y_1, x_2, y_2 columns")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(), lambda a: convert_inshop(a.root, bboxes=not a.no_bboxes, strict=a.strict), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
