"""CUHK03-NP (Zhong et al., CVPR 2017, the "new protocol" folders) -> OML CSV with the standard re-ID protocol.

``--subset labeled`` (hand-drawn boxes) or ``detected`` (DPM boxes), each a Market-like folder:
train = ``bounding_box_train/`` (767 persons), validation = ``query/`` (queries: one image per test person and
camera, 1,400) + ``bounding_box_test/`` (gallery) of the other 700 persons. Images are PNGs named
``<pid 4 digits>_c<camera 1-2>_<n>.png`` (e.g. ``0001_c1_5.png``); "camera" is the view of the camera pair.

As for Market-1501, ``sequence = "<label>_c<cam>"`` makes OML leave gallery images of the query's person
taken by the query's camera out of its ranking (the protocol's junk), and a ``camera`` column is added.
Test labels are the person numbers plus 10,000 (``TEST_LABEL_OFFSET``), so they can never be mistaken for
a train person with the same number. A malformed file name is an error naming the file (``--skip-bad`` skips
and counts it, and drops queries left without a gallery image of their person from the other camera).

Published counts (Zhong's README): labeled 7,368 train / 1,400 query / 5,328 gallery images, detected
7,365 / 1,400 / 5,332; 767 train and 700 test persons in both.

Layouts: ``cuhk03-np/{labeled,detected}/...`` as released; ROOT may be the release folder, its parent, or
a subset folder. Without ``--subset`` a subset folder converts as itself, any other ROOT as ``labeled``.
Pass the subset folder to keep one ``dataset.csv`` per subset (ROOT/dataset.csv otherwise serves both).

    python converters/cuhk03np.py ROOT [--subset labeled|detected] [--out CSV] [--strict] [--skip-bad]

This module also holds the re-ID pieces MSMT17 and VeRi-776 share: :func:`scan_named_images`,
:func:`offset_labels`, :func:`reid_counts` and :func:`reid_frame` (with Market-1501's rows and query check).
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd

from converters.common import (
    DEFAULT_CSV_NAME,
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    list_some,
    make_rows_frame,
    rel_posix,
    require_dirs,
    run_cli,
    scan_image_files,
)
from converters.market1501 import BAD_NAME_REASON, COLUMNS, build_rows, drop_unscorable_queries

# ------------------------------------------------------------------------------------- re-ID (shared)

Record = tuple[str, int, int]  # path relative to the root, label, camera (Market-1501's records)
TEST_LABEL_OFFSET = 10_000


def scan_named_images(
    folder: Path,
    root: Path,
    parse: Callable[[str], tuple[int, int]],
    *,
    extensions: tuple[str, ...],
    dataset: str,
    skip_bad: bool,
    report: ConversionReport,
) -> list[Record]:
    """(path, id, camera) of the images directly in ``folder``, parsed from their names; a name ``parse``
    rejects (ValueError) is an error naming the file, or skipped and counted with ``skip_bad``."""
    records = []
    for entry, rel in scan_image_files(folder, root, report, extensions=extensions):
        try:
            pid, cam = parse(entry.name)
        except ValueError as e:
            if not skip_bad:
                raise ConversionError(f"{rel}: {e}. Rename or remove it, or pass --skip-bad to skip such files.") from e
            report.skip(BAD_NAME_REASON, rel)
            continue
        records.append((rel, pid, cam))
    if not records:
        raise ConversionError(f"{rel_posix(folder, root)}/ holds no {dataset} images")
    return records


def offset_labels(records: list[Record], offset: int = TEST_LABEL_OFFSET) -> list[Record]:
    return [(rel, pid + offset, cam) for rel, pid, cam in records]


def check_disjoint_ids(
    train: list[Record], test: list[Record], what: str, report: ConversionReport | None = None
) -> None:
    """No id is both a train and a test id (before any offset): the protocols keep the sets apart. An error,
    or a warning in ``report`` where test labels are offset anyway."""
    shared = sorted({pid for _, pid, _ in train} & {pid for _, pid, _ in test})
    if not shared:
        return
    example = next(rel for rel, pid, _ in test if pid == shared[0])
    message = f"{what} id(s) in both the train and the test images: {list_some(shared)} (e.g. {example})"
    if report is None:
        raise ConversionError(message)
    report.warn(message + f"; kept apart by the test label offset {TEST_LABEL_OFFSET:,}")


def reid_counts(train: list[Record], query: list[Record], gallery: list[Record]) -> dict[str, int]:
    """The counts the re-ID datasets publish: images per role, train and test identities, cameras."""
    return {
        "train images": len(train),
        "train identities": len({pid for _, pid, _ in train}),
        "query images": len(query),
        "gallery images": len(gallery),
        "test identities": len({pid for _, pid, _ in query + gallery}),
        "cameras": len({cam for _, _, cam in train + query + gallery}),
    }


def reid_frame(
    train: list[Record], query: list[Record], gallery: list[Record], skip_bad: bool, report: ConversionReport
) -> tuple[pd.DataFrame, list[Record]]:
    """Market-1501's rows (``camera``, ``sequence = "<label>_c<cam>"``) after its check that every query has a
    gallery image of its id from another camera; returns the frame and the queries kept."""
    query = drop_unscorable_queries(query, gallery, skip_bad, report)
    return make_rows_frame(build_rows(train, query, gallery), COLUMNS), query


# ------------------------------------------------------------------------------------------ CUHK03-NP

SUBSETS = ("labeled", "detected")
TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"
USED_DIRS = (TRAIN_DIR, QUERY_DIR, GALLERY_DIR)
ROOT_CANDIDATES = (".", "cuhk03-np", "CUHK03-NP")
NAME_PATTERN = re.compile(r"^(?P<pid>\d{4})_c(?P<cam>\d)_(?P<n>\d+)\.(?i:png)$")
CAMERAS = (1, 2)

PUBLISHED_COUNTS: Mapping[str, Mapping[str, int]] = {
    "labeled": {
        "train images": 7_368,
        "train identities": 767,
        "query images": 1_400,
        "gallery images": 5_328,
        "test identities": 700,
        "cameras": 2,
    },
    "detected": {
        "train images": 7_365,
        "train identities": 767,
        "query images": 1_400,
        "gallery images": 5_332,
        "test identities": 700,
        "cameras": 2,
    },
}


def parse_cuhk03np_name(name: str) -> tuple[int, int]:
    """``PPPP_cC_N.png`` -> (person id, camera); ValueError says what is wrong."""
    match = NAME_PATTERN.match(name)
    if match is None:
        raise ValueError("name does not follow PPPP_cC_N.png (e.g. 0001_c1_5.png)")
    cam = int(match["cam"])
    if cam not in CAMERAS:
        raise ValueError(f"camera {cam} is not 1 or 2")
    return int(match["pid"]), cam


def find_subset_folder(root: Path, subset: str) -> Path:
    """The folder holding the subset's three image folders: ROOT/<subset>, ROOT/cuhk03-np/<subset>, or ROOT."""
    candidates = [root / c / subset for c in ROOT_CANDIDATES] + [root]
    for candidate in candidates:
        if all((candidate / d).is_dir() for d in USED_DIRS):
            if candidate == root and root.name in SUBSETS and root.name != subset:
                raise ConversionError(f"CUHK03-NP: {root} is the {root.name} subset, not {subset}; pass its parent")
            return candidate
    partial = next((c for c in candidates if c.is_dir() and any((c / d).is_dir() for d in USED_DIRS)), None)
    if partial is not None:
        require_dirs(partial, USED_DIRS, f"CUHK03-NP {subset}")  # raises, naming the missing folders
    raise ConversionError(
        f"CUHK03-NP: no {subset}/ folder holding {', '.join(d + '/' for d in USED_DIRS)} in {root} or "
        f"{root / 'cuhk03-np'}. Pass the folder that holds labeled/ and detected/."
    )


def convert_cuhk03np(
    root: Path | str,
    *,
    subset: str | None = None,
    strict: bool = False,
    skip_bad: bool = False,
    expected_counts: Mapping[str, int] | None = None,
) -> Conversion:
    root = Path(root)
    if subset is None:  # a subset folder converts as itself; the release folder as its labeled subset
        subset = root.name if root.name in SUBSETS and all((root / d).is_dir() for d in USED_DIRS) else "labeled"
    if subset not in SUBSETS:
        raise ConversionError(f"unknown subset {subset!r}; use one of {SUBSETS}")
    base = find_subset_folder(root, subset)
    report = ConversionReport(f"CUHK03-NP ({subset})", label_noun="identities")
    train, query, gallery = (
        scan_named_images(
            base / d, root, parse_cuhk03np_name, extensions=(".png",), dataset="CUHK03-NP", skip_bad=skip_bad,
            report=report,
        )
        for d in USED_DIRS
    )
    check_disjoint_ids(train, query + gallery, "person", report)
    query, gallery = offset_labels(query), offset_labels(gallery)  # test persons get their own label range
    df, query = reid_frame(train, query, gallery, skip_bad, report)
    expected = PUBLISHED_COUNTS[subset] if expected_counts is None else expected_counts
    check_expected_counts(
        reid_counts(train, query, gallery), expected, strict=strict, report=report, what=f"CUHK03-NP {subset}"
    )
    where = "" if base == root else rel_posix(base, root) + "/"
    read = ", ".join(f"{where}{d}/" for d in USED_DIRS)
    report.note(f"read {read}; test labels are person ids + {TEST_LABEL_OFFSET:,}")
    unused = sorted(
        p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if p.name not in (*USED_DIRS, DEFAULT_CSV_NAME)
    )
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(df, report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("CUHK03-NP -> OML dataset.csv (new protocol: 767 train / 700 test persons).")
    parser.add_argument(
        "--subset",
        choices=SUBSETS,
        default=None,
        help="labeled (hand-drawn boxes) or detected (DPM boxes); default: ROOT's own subset when ROOT is "
        "labeled/ or detected/, else labeled",
    )
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) malformed file names and queries with no cross-camera match instead of failing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(),
        lambda a: convert_cuhk03np(a.root, subset=a.subset, strict=a.strict, skip_bad=a.skip_bad),
        argv,
    )


if __name__ == "__main__":
    raise SystemExit(main())
