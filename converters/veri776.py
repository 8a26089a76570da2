"""VeRi-776 folder -> OML CSV with the standard image-to-image vehicle re-ID protocol.

train = ``image_train/`` (37,778 images of 576 vehicles); validation = ``image_query/`` (1,678 queries) +
``image_test/`` (the 11,579-image gallery) of the other 200 vehicles. Names are
``<vehicle id 4 digits>_c<camera 3 digits>_<frame>_<n>.jpg`` (e.g. ``0002_c002_00030600_0.jpg``), 20
cameras, vehicle ids up to 776 and the same number for the same vehicle everywhere, so labels are the ids.

The official junk (``jk_index.txt``) is every test image of the query's vehicle taken by the query's
camera; as for Market-1501, ``sequence = "<vid>_c<cam>"`` makes OML leave those out of the ranking, and a
``camera`` column is added. The query images also sit in ``image_test/``: without this rule a query would
find its own copy at rank 1. A malformed file name is an error naming the file (``--skip-bad`` skips and
counts it, and drops queries left without a gallery image of their vehicle from another camera). Where
``name_train.txt`` / ``name_query.txt`` / ``name_test.txt`` are present, a folder that disagrees with its
list is a warning.

Layouts: the archive's ``VeRi/`` folder, or its contents.

    python converters/veri776.py ROOT [--out CSV] [--strict] [--skip-bad]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Mapping, Sequence

from converters.common import (
    DEFAULT_CSV_NAME,
    Conversion,
    ConversionReport,
    base_parser,
    check_expected_counts,
    list_some,
    rel_posix,
    require_dirs,
    run_cli,
)
from converters.reid import Record, check_disjoint_ids, reid_counts, reid_frame, scan_named_images

TRAIN_DIR, QUERY_DIR, GALLERY_DIR = "image_train", "image_query", "image_test"
USED_DIRS = (TRAIN_DIR, QUERY_DIR, GALLERY_DIR)
NAME_LISTS = {TRAIN_DIR: "name_train.txt", QUERY_DIR: "name_query.txt", GALLERY_DIR: "name_test.txt"}
ROOT_CANDIDATES = (".", "VeRi", "VeRi-776", "VeRi776")
NAME_PATTERN = re.compile(r"^(?P<vid>\d{4})_c(?P<cam>\d{3})_(?P<frame>\d+)_(?P<n>\d+)\.(?i:jpg)$")
MAX_VEHICLE_ID, CAMERAS = 776, range(1, 21)

PUBLISHED_COUNTS: Mapping[str, int] = {
    "train images": 37_778,
    "train identities": 576,
    "query images": 1_678,
    "gallery images": 11_579,
    "test identities": 200,
    "cameras": 20,
}


def parse_veri_name(name: str) -> tuple[int, int]:
    """``VVVV_cCCC_FFFFFFFF_N.jpg`` -> (vehicle id, camera); ValueError says what is wrong."""
    match = NAME_PATTERN.match(name)
    if match is None:
        raise ValueError("name does not follow VVVV_cCCC_FFFFFFFF_N.jpg (e.g. 0002_c002_00030600_0.jpg)")
    vid, cam = int(match["vid"]), int(match["cam"])
    if cam not in CAMERAS:
        raise ValueError(f"camera {cam} is outside 1-20")
    if not 1 <= vid <= MAX_VEHICLE_ID:
        raise ValueError(f"vehicle id {vid} is outside 1-{MAX_VEHICLE_ID}")
    return vid, cam


def find_veri_base(root: Path) -> Path:
    for candidate in ROOT_CANDIDATES:
        if all((root / candidate / d).is_dir() for d in USED_DIRS):
            return root / candidate
    require_dirs(root, USED_DIRS, "VeRi-776")  # raises, naming the missing folders
    raise AssertionError("unreachable")


def _compare_with_name_list(
    base: Path, root: Path, folder: str, records: list[Record], report: ConversionReport
) -> None:
    """The folder's images against its name_*.txt (one file name a line), where the list exists."""
    list_path = base / NAME_LISTS[folder]
    if not list_path.is_file():
        return
    listed = {line.strip() for line in list_path.read_text(errors="replace").splitlines() if line.strip()}
    present = {rel.rsplit("/", 1)[-1] for rel, _, _ in records}
    missing, unlisted = sorted(listed - present), sorted(present - listed)
    if missing or unlisted:
        report.warn(
            f"{folder}/ and {rel_posix(list_path, root)} disagree: {len(missing):,} listed image(s) not in the "
            f"folder ({list_some(missing, 3)}), {len(unlisted):,} image(s) not listed ({list_some(unlisted, 3)})"
        )


def convert_veri776(
    root: Path | str,
    *,
    strict: bool = False,
    skip_bad: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    root = Path(root)
    base = find_veri_base(root)
    report = ConversionReport("VeRi-776", label_noun="vehicles")
    train, query, gallery = (
        scan_named_images(
            base / d, root, parse_veri_name, extensions=(".jpg",), dataset="VeRi-776", skip_bad=skip_bad,
            report=report,
        )
        for d in USED_DIRS
    )
    for folder, records in zip(USED_DIRS, (train, query, gallery)):
        _compare_with_name_list(base, root, folder, records, report)
    check_disjoint_ids(train, query + gallery, "vehicle")
    df, query = reid_frame(train, query, gallery, skip_bad, report)
    expected = PUBLISHED_COUNTS if expected_counts is None else expected_counts
    check_expected_counts(reid_counts(train, query, gallery), expected, strict=strict, report=report, what="VeRi-776")
    gallery_names = {rel.rsplit("/", 1)[-1] for rel, _, _ in gallery}
    in_gallery = sum(rel.rsplit("/", 1)[-1] in gallery_names for rel, _, _ in query)
    if in_gallery:
        report.note(f"{in_gallery:,} query image(s) also in {GALLERY_DIR}/: left out of their ranking by `sequence`")
    used = {*USED_DIRS, *NAME_LISTS.values(), DEFAULT_CSV_NAME}
    unused = sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if p.name not in used)
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(df, report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("VeRi-776 -> OML dataset.csv (image-to-image protocol, same-camera matches excluded).")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) malformed file names and queries with no cross-camera match instead of failing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), lambda a: convert_veri776(a.root, strict=a.strict, skip_bad=a.skip_bad), argv)


if __name__ == "__main__":
    raise SystemExit(main())
