"""The re-ID protocol pieces Market-1501, CUHK03-NP, MSMT17 and VeRi-776 share: records read from file names,
the test-label offset, the train/test id check, the published-count keys, and Market-1501's rows (``camera``,
``sequence = "<label>_c<cam>"``, so OML leaves same-person same-camera gallery images out of a query's ranking)
after its check that every query has a gallery image of its person from another camera."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Callable

import pandas as pd

from converters.common import (
    TRAIN,
    VALIDATION,
    ConversionError,
    ConversionReport,
    list_some,
    make_rows_frame,
    rel_posix,
    scan_image_files,
)
from metriclab.core.constants import (
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    SEQUENCE_COLUMN,
    SPLIT_COLUMN,
)

CAMERA_COLUMN = "camera"
BAD_NAME_REASON = "malformed file names skipped (--skip-bad)"
INVALID_QUERY_REASON = "queries without a gallery image of their person from another camera (--skip-bad)"

COLUMNS = [
    LABELS_COLUMN, PATHS_COLUMN, SPLIT_COLUMN, IS_QUERY_COLUMN, IS_GALLERY_COLUMN, CAMERA_COLUMN, SEQUENCE_COLUMN
]  # fmt: skip

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


def drop_unscorable_queries(
    query: list[Record], gallery: list[Record], skip_bad: bool, report: ConversionReport
) -> list[Record]:
    """Queries with no gallery image of their person from another camera: an error, or skipped with skip_bad."""
    gallery_cams = defaultdict(set)
    for _, pid, cam in gallery:
        gallery_cams[pid].add(cam)
    invalid = [rel for rel, pid, cam in query if not (gallery_cams[pid] - {cam})]
    if invalid and not skip_bad:
        raise ConversionError(
            f"{len(invalid):,} query image(s) have no gallery image of the same person from another camera, "
            f"so the protocol cannot score them: {list_some(invalid)}. Add their gallery images, remove them, "
            f"or pass --skip-bad to drop them."
        )
    for rel in invalid:
        report.skip(INVALID_QUERY_REASON, rel)
    invalid_set = set(invalid)
    return [r for r in query if r[0] not in invalid_set]


def build_rows(train: list[Record], query: list[Record], gallery: list[Record]) -> list[dict]:
    rows = []
    for records, split, is_query, is_gallery in (
        (train, TRAIN, None, None),
        (query, VALIDATION, True, False),
        (gallery, VALIDATION, False, True),
    ):
        for rel, pid, cam in records:
            rows.append(
                {
                    LABELS_COLUMN: pid,
                    PATHS_COLUMN: rel,
                    SPLIT_COLUMN: split,
                    IS_QUERY_COLUMN: is_query,
                    IS_GALLERY_COLUMN: is_gallery,
                    CAMERA_COLUMN: cam,
                    SEQUENCE_COLUMN: f"{pid}_c{cam}",
                }
            )
    return rows


__all__ = ["BAD_NAME_REASON", "CAMERA_COLUMN", "COLUMNS", "INVALID_QUERY_REASON", "TEST_LABEL_OFFSET", "Record",
           "build_rows", "check_disjoint_ids", "drop_unscorable_queries", "offset_labels", "reid_counts", "reid_frame",
           "scan_named_images"]
