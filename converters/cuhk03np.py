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
"""
from __future__ import annotations

import argparse
import re
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
    require_dirs,
    run_cli,
)
from converters.reid import (
    TEST_LABEL_OFFSET,
    check_disjoint_ids,
    offset_labels,
    reid_counts,
    reid_frame,
    scan_named_images,
)

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
