"""Market-1501 folder -> OML CSV with the standard single-query re-ID protocol.

train = bounding_box_train/; validation = query/ (queries) + bounding_box_test/ (gallery) with the junk
id -1 dropped and the distractor id 0000 kept as a negative. ``sequence = "<pid>_c<cam>"`` makes OML leave
gallery images of the query's person taken by the query's camera out of its ranking, as torchreid does.

    python converters/market1501.py ROOT [--out CSV] [--strict] [--skip-bad]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Mapping, Sequence

from converters.common import (
    Conversion,
    ConversionError,
    ConversionReport,
    base_parser,
    check_expected_counts,
    list_some,
    make_rows_frame,
    require_dirs,
    run_cli,
)
from converters.reid import COLUMNS, Record, build_rows, drop_unscorable_queries, scan_named_images

TRAIN_DIR, GALLERY_DIR, QUERY_DIR = "bounding_box_train", "bounding_box_test", "query"
USED_DIRS = (TRAIN_DIR, QUERY_DIR, GALLERY_DIR)
# The archive's own top folder, and torchreid's market1501/ wrapper around it.
ROOT_CANDIDATES = (".", "Market-1501-v15.09.15", "market1501", "market1501/Market-1501-v15.09.15")
# PPPP_cCsS_FFFFFF_BB.jpg on the basename only (torchreid searches the full path, which a parent folder can fool).
NAME_PATTERN = re.compile(r"^(?P<pid>-1|\d{4})_c(?P<cam>\d)s(?P<seq>\d)_(?P<frame>\d{6})_(?P<box>\d{2})\.(?i:jpg)$")
JUNK_PID, DISTRACTOR_PID, MAX_PID = -1, 0, 1501
CAMERAS = range(1, 7)

JUNK_REASON = "junk images (person id -1) dropped from the gallery"

# Market-1501-v15.09.15 as released: the counts given on the dataset's project page and by torchreid.
PUBLISHED_COUNTS: Mapping[str, int] = {
    "train images": 12_936,
    "train identities": 751,
    "query images": 3_368,
    "query identities": 750,
    "gallery images after junk removal": 15_913,
    "gallery identities incl. distractor id 0000": 751,
    "gallery junk images (id -1)": 3_819,
    "gallery distractor images (id 0000)": 2_798,
}



def parse_market_name(name: str) -> tuple[int, int]:
    """``PPPP_cCsS_FFFFFF_BB.jpg`` -> (person id, camera); ValueError says what is wrong."""
    match = NAME_PATTERN.match(name)
    if match is None:
        raise ValueError("name does not follow PPPP_cCsS_FFFFFF_BB.jpg (e.g. 0002_c1s1_000451_03.jpg)")
    pid, cam = int(match["pid"]), int(match["cam"])
    if cam not in CAMERAS:
        raise ValueError(f"camera {cam} is outside 1-6")
    if pid > MAX_PID:
        raise ValueError(f"person id {pid} is above {MAX_PID}")
    return pid, cam


def find_market_base(root: Path) -> Path:
    for candidate in ROOT_CANDIDATES:
        base = root / candidate
        if all((base / d).is_dir() for d in USED_DIRS):
            return base
    require_dirs(root, USED_DIRS, "Market-1501")  # raises, naming the missing folders
    raise AssertionError("unreachable")


def _check_special_pids(train: list[Record], query: list[Record]) -> None:
    """The junk (-1) and distractor (0000) ids occur only in the gallery."""
    for folder, records in ((TRAIN_DIR, train), (QUERY_DIR, query)):
        special = [rel for rel, pid, _ in records if pid in (JUNK_PID, DISTRACTOR_PID)]
        if special:
            raise ConversionError(
                f"person id -1/0000 belongs in {GALLERY_DIR}/ only, found in {folder}/: {list_some(special)}"
            )


def _drop_junk(gallery_raw: list[Record], report: ConversionReport) -> list[Record]:
    gallery = []
    for rel, pid, cam in gallery_raw:
        if pid == JUNK_PID:
            report.skip(JUNK_REASON, rel)  # neither positive nor negative in the official protocol
        else:
            gallery.append((rel, pid, cam))
    return gallery


def _check_disjoint_pids(train: list[Record], query: list[Record], gallery: list[Record]) -> None:
    """No person is both in train and in query/gallery (the distractor id aside)."""
    train_pids = {pid for _, pid, _ in train}
    test_pids = {pid for _, pid, _ in query + gallery} - {DISTRACTOR_PID}
    shared = sorted(train_pids & test_pids)
    if shared:
        raise ConversionError(f"person id(s) in both {TRAIN_DIR}/ and query/gallery: {list_some(shared)}")


def _check_counts(
    train: list[Record], query: list[Record], gallery: list[Record], strict: bool, report: ConversionReport
) -> None:
    """Notes the distractors, then checks every count against the published ones."""
    n_distractors = sum(pid == DISTRACTOR_PID for _, pid, _ in gallery)
    report.note(f"{n_distractors:,} distractor images (person id 0000) kept in the gallery as negatives")
    actual = {
        "train images": len(train),
        "train identities": len({pid for _, pid, _ in train}),
        "query images": len(query),
        "query identities": len({pid for _, pid, _ in query}),
        "gallery images after junk removal": len(gallery),
        "gallery identities incl. distractor id 0000": len({pid for _, pid, _ in gallery}),
        "gallery junk images (id -1)": report.n_skipped(JUNK_REASON),
        "gallery distractor images (id 0000)": n_distractors,
    }
    check_expected_counts(actual, PUBLISHED_COUNTS, strict=strict, report=report, what="Market-1501")


def convert_market1501(root: Path | str, *, strict: bool = False, skip_bad: bool = False) -> Conversion:
    root = Path(root)
    base = find_market_base(root)
    report = ConversionReport("Market-1501", label_noun="identities")
    train, query, gallery_raw = (
        scan_named_images(base / d, root, parse_market_name, extensions=(".jpg",), dataset="Market-1501",
                          skip_bad=skip_bad, report=report)
        for d in USED_DIRS
    )
    _check_special_pids(train, query)
    gallery = _drop_junk(gallery_raw, report)
    _check_disjoint_pids(train, query, gallery)
    query = drop_unscorable_queries(query, gallery, skip_bad, report)
    _check_counts(train, query, gallery, strict, report)
    unused = sorted(p.name + ("/" if p.is_dir() else "") for p in base.iterdir() if p.name not in USED_DIRS)
    if unused:
        report.note(f"not used: {', '.join(unused)}")
    return Conversion(make_rows_frame(build_rows(train, query, gallery), COLUMNS), report, root)


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser("Market-1501 -> OML dataset.csv (standard single-query re-ID protocol).")
    parser.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count) malformed file names and queries with no cross-camera match instead of failing",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(
        build_parser(), lambda a: convert_market1501(a.root, strict=a.strict, skip_bad=a.skip_bad), argv
    )


if __name__ == "__main__":
    raise SystemExit(main())
