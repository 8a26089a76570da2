"""MSMT17 (V1, or V2 with blurred faces) -> OML CSV with the standard re-ID protocol.

The list files decide every role: ``list_train.txt`` and ``list_val.txt`` (train; paths relative to the
train folder), ``list_query.txt`` and ``list_gallery.txt`` (validation; relative to the test folder), one
``<path> <person id>`` a line, e.g. ``0000/0000_045_12_0303morning_0006_2.jpg 0``. V1 keeps the images in
``MSMT17_V1/train/`` and ``test/``, V2 in ``MSMT17_V2/mask_train_v2/`` and ``mask_test_v2/``; the lists are
the same. The camera is the third ``_`` field of the file name (01-15, kept 1-based).

Train = list_train + list_val (the 32,621 images of 1,041 persons of the published train set); with
``--exclude-val`` list_train only, as torchreid trains by default. Validation: 11,659 queries against
82,161 gallery images of 3,060 persons; ``sequence = "<label>_c<cam>"`` leaves gallery images of the query's
person from the query's camera out of its ranking, as for Market-1501, and a ``camera`` column is added.
Train and test number their persons independently (both from 0), so test labels are the listed id plus
10,000. The published counts are checked on all four lists (list_val included, whatever the flag).

A malformed line is an error naming the file and the line; so is a file name whose person id differs from
its line's (``--skip-bad`` skips and counts such names, and drops queries left without a gallery image of
their person from another camera).

    python converters/msmt17.py ROOT [--exclude-val] [--out CSV] [--strict] [--skip-bad]
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from converters.common import (
    DEFAULT_CSV_NAME,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    rel_posix,
    run_cli,
)
from converters.listfiles import check_listed_images, check_relative_path, parse_int, read_list_lines
from converters.reid import BAD_NAME_REASON, TEST_LABEL_OFFSET, Record, offset_labels, reid_counts, reid_frame

TRAIN_LIST, VAL_LIST, QUERY_LIST, GALLERY_LIST = "list_train.txt", "list_val.txt", "list_query.txt", "list_gallery.txt"
LISTS = (TRAIN_LIST, VAL_LIST, QUERY_LIST, GALLERY_LIST)
VERSION_DIRS = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
ROOT_CANDIDATES = (".", "MSMT17_V1", "MSMT17_V2", "MSMT17")
# <pid>_<nnn>_<camera 01-15>_<date><morning|noon|afternoon>_<nnnn>_<n>[_ex].jpg
NAME_PATTERN = re.compile(r"^(?P<pid>\d{4})_(?P<n>\d{3})_(?P<cam>\d{2})_[^/]+\.(?i:jpg)$")
CAMERAS = range(1, 16)
VAL_EXCLUDED_REASON = f"{VAL_LIST} images left out of training (--exclude-val)"

PUBLISHED_COUNTS: Mapping[str, int] = {
    "train images": 32_621,
    "train identities": 1_041,
    "query images": 11_659,
    "gallery images": 82_161,
    "test identities": 3_060,
    "cameras": 15,
}


@dataclass(frozen=True)
class MsmtLayout:
    base: Path
    version: str
    train_dir: Path
    test_dir: Path


def find_msmt_layout(root: Path) -> MsmtLayout:
    for candidate in ROOT_CANDIDATES:
        base = root / candidate
        if not (base / TRAIN_LIST).is_file():
            continue
        for version, (train_dir, test_dir) in VERSION_DIRS.items():
            if (base / train_dir).is_dir() and (base / test_dir).is_dir():
                return MsmtLayout(base, version, base / train_dir, base / test_dir)
        raise ConversionError(
            f"MSMT17: {base} holds {TRAIN_LIST} but neither train/ + test/ (V1) nor mask_train_v2/ + "
            f"mask_test_v2/ (V2)"
        )
    raise ConversionError(
        f"MSMT17: {TRAIN_LIST} not found in {root} or its MSMT17_V1/ or MSMT17_V2/. Pass the folder that holds "
        f"the list files and the image folders."
    )


def parse_msmt_name(name: str, pid: int) -> int:
    """The camera of file ``name`` listed with person ``pid``; ValueError says what is wrong."""
    match = NAME_PATTERN.match(name)
    if match is None:
        raise ValueError(f"file name {name!r} does not follow PPPP_NNN_CC_<date><time>_NNNN_N.jpg")
    if int(match["pid"]) != pid:
        raise ValueError(f"file name {name!r} is of person {int(match['pid'])}, the line says {pid}")
    cam = int(match["cam"])
    if cam not in CAMERAS:
        raise ValueError(f"camera {cam} is outside 1-15")
    return cam


def read_msmt_list(
    path: Path, images: Path, root: Path, skip_bad: bool, report: ConversionReport, seen: dict[str, str]
) -> list[tuple[Record, str]]:
    """((path, person id, camera), where) per line of a list; ``seen`` (path -> line) catches repeats across lists."""
    records = []
    for line in read_list_lines(path, root, 2):
        listed = check_relative_path(line.fields[0], line.where)
        pid = parse_int(line.fields[1], line.where, "person id", low=0)
        rel = rel_posix(images / listed, root)
        try:
            cam = parse_msmt_name(listed.rsplit("/", 1)[-1], pid)
        except ValueError as e:
            if not skip_bad:
                raise ConversionError(f"{line.where}: {e}. Fix the line, or pass --skip-bad to skip it.") from e
            report.skip(BAD_NAME_REASON, f"{line.where}: {listed}")
            continue
        if rel in seen:
            raise ConversionError(f"{line.where}: {listed} is already listed at {seen[rel]}")
        seen[rel] = line.where
        records.append(((rel, pid, cam), line.where))
    return records


def convert_msmt17(
    root: Path | str,
    *,
    exclude_val: bool = False,
    strict: bool = False,
    skip_bad: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    root = Path(root)
    layout = find_msmt_layout(root)
    report = ConversionReport(f"MSMT17 ({layout.version})", label_noun="identities")
    seen: dict[str, str] = {}
    lists = {
        name: read_msmt_list(layout.base / name, images, root, skip_bad, report, seen)
        for name, images in zip(LISTS, (layout.train_dir, layout.train_dir, layout.test_dir, layout.test_dir))
    }
    check_listed_images([(root / r[0], where) for entries in lists.values() for r, where in entries], root, report)
    train_list, val_list, query, gallery = ([r for r, _ in lists[name]] for name in LISTS)
    train = train_list if exclude_val else train_list + val_list
    if exclude_val:
        for rel, _, _ in val_list:
            report.skip(VAL_EXCLUDED_REASON, rel)
    test_gallery = offset_labels(gallery)  # test persons get their own label range
    df, kept_query = reid_frame(train, offset_labels(query), test_gallery, skip_bad, report)
    actual = reid_counts(train_list + val_list, kept_query, test_gallery)  # list_val counted whatever the flag
    expected = PUBLISHED_COUNTS if expected_counts is None else expected_counts
    check_expected_counts(actual, expected, strict=strict, report=report, what="MSMT17")
    report.note(
        f"read {', '.join(rel_posix(layout.base / n, root) for n in LISTS)}; images in "
        f"{rel_posix(layout.train_dir, root)}/ and {rel_posix(layout.test_dir, root)}/; "
        f"test labels are person ids + {TEST_LABEL_OFFSET:,}"
    )
    used = {*LISTS, layout.train_dir.name, layout.test_dir.name, DEFAULT_CSV_NAME}
    unused = sorted(p.name + ("/" if p.is_dir() else "") for p in layout.base.iterdir() if p.name not in used)
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(df, report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("MSMT17 (V1 or V2) -> OML dataset.csv (standard re-ID protocol from the list files).")
    parser.add_argument(
        "--exclude-val",
        action="store_true",
        help=f"train on {TRAIN_LIST} only (torchreid's default); default: {TRAIN_LIST} + {VAL_LIST}",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) list lines with a malformed file name and queries with no cross-camera match",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        lambda a: convert_msmt17(a.root, exclude_val=a.exclude_val, strict=a.strict, skip_bad=a.skip_bad),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
