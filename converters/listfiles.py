"""The pieces the list-driven converters (SOP, InShop, CUB-200-2011, MSMT17) share: reading a whitespace-separated
list file with malformed lines named by file and line, integer fields, listed paths, listed images checked against
the folders, and boxes cut to their image."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from PIL import Image

from converters.common import (
    ConversionError,
    ConversionReport,
    list_some,
    rel_posix,
    scan_image_files,
)
from metriclab.data.contract import outside_root

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


__all__ = ["UNLISTED_REASON", "Box", "ListLine", "check_listed_images", "check_relative_path", "clip_box_to_image",
           "parse_int", "read_list_lines"]
