"""Shared pieces of the dataset converters: report, format checks, summary, atomic CSV write, CLI runner.

Every converter is a function ``folder -> Conversion`` (a DataFrame in OML's format plus a report of
what was skipped and why) and a small CLI built with :func:`run_cli`.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import pandas as pd
from PIL import Image

from metriclab.core.atomic import atomic_write
from metriclab.core.constants import (
    BBOX_COLUMNS,
    IMAGE_EXTENSIONS,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    SPLIT_COLUMN,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
)
from metriclab.core.errors import ConfigError
from metriclab.data.contract import (  # noqa: F401  (MAX_LISTED, list_some: the converters use them from here)
    DEFAULT_CSV_NAME,
    MAX_LISTED,
    list_some,
    validate_dataset_frame,
)

TRAIN = TRAIN_SPLIT
VALIDATION = VALIDATION_SPLIT
# Skip reasons shared by the converters (summaries and tests quote them).
SUBFOLDER_REASON = "sub-folders ignored"
NON_IMAGE_REASON = "non-image files ignored"


class ConversionError(ValueError):
    """The input folder cannot be converted; the message names the file/key and what to do."""


@dataclass
class ConversionReport:
    """What a converter skipped (reason -> items), noticed (notes) and doubts (warnings)."""

    dataset: str
    label_noun: str = "labels"
    skipped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def skip(self, reason: str, item: str) -> None:
        self.skipped[reason].append(item)

    def note(self, message: str) -> None:
        self.notes.append(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)

    def n_skipped(self, reason: str) -> int:
        return len(self.skipped.get(reason, ()))


@dataclass
class Conversion:
    df: pd.DataFrame
    report: ConversionReport
    dataset_root: Path


def rel_posix(path: Path, root: Path) -> str:
    """Path relative to the dataset root with forward slashes, as OML joins it to ``dataset_root``."""
    return path.relative_to(root).as_posix()


def is_image_name(name: str, extensions: tuple[str, ...] = IMAGE_EXTENSIONS) -> bool:
    """An image extension (any case), and not hidden: ``._x.jpg`` is a macOS resource fork, not an image."""
    return name.lower().endswith(extensions) and not name.startswith(".")


def scan_image_files(
    folder: Path, root: Path, report: ConversionReport, extensions: tuple[str, ...] = IMAGE_EXTENSIONS
) -> list[tuple[os.DirEntry, str]]:
    """The image files directly in ``folder``, sorted by name, each with its root-relative path. Sub-folders
    and other files (Thumbs.db, .DS_Store, ``._*`` resource forks, ...) are reported as skipped."""
    images = []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        rel = rel_posix(Path(entry.path), root)
        if entry.is_dir():
            report.skip(SUBFOLDER_REASON, rel + "/")
        elif not is_image_name(entry.name, extensions):
            report.skip(NON_IMAGE_REASON, rel)
        else:
            images.append((entry, rel))
    return images


@dataclass(frozen=True)
class ImageInfo:
    sha1: str
    width: int
    height: int
    mode: str
    format: str
    extension_matches: bool  # False e.g. for PNG bytes behind a .jpg name (both OML readers sniff content)


def inspect_image(path: Path) -> ImageInfo:
    """Read the file once: hash its bytes and decode them fully. ValueError says what is wrong."""
    data = Path(path).read_bytes()
    if not data:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF/palette chatter, one line per file otherwise
            with Image.open(io.BytesIO(data)) as image:
                mode, image_format, (width, height) = image.mode, image.format, image.size
                # JPEG: decode at 1/8 scale, still reading every byte, so truncation is caught ~4x faster.
                image.draft(None, (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from e
    expected_format = Image.registered_extensions().get(Path(path).suffix.lower())
    matches = image_format == expected_format or (expected_format == "JPEG" and image_format == "MPO")
    return ImageInfo(hashlib.sha1(data).hexdigest(), width, height, mode, image_format, matches)


def require_dirs(base: Path, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if not (base / n).is_dir()]
    if missing:
        raise ConversionError(
            f"{what}: missing folder(s) {', '.join(n + '/' for n in missing)} in {base}. "
            f"Pass the folder that contains {', '.join(n + '/' for n in names)}."
        )


def check_expected_counts(
    actual: Mapping[str, int],
    expected: Mapping[str, int],
    *,
    strict: bool,
    report: ConversionReport,
    what: str,
) -> None:
    """Published counts: a mismatch is an error with ``--strict`` and a warning otherwise (subsets exist)."""
    mismatches = [
        f"{key}: expected {expected[key]:,}, found {actual[key]:,}" for key in expected if actual[key] != expected[key]
    ]
    if not mismatches:
        report.note(f"all published {what} counts match ({len(expected)} checked)")
        return
    message = f"counts differ from the published {what} ones: " + "; ".join(mismatches)
    if strict:
        raise ConversionError(message + ". Drop --strict to convert a subset or a re-pack anyway.")
    report.warn(message)


def make_rows_frame(rows: list[dict], columns: Sequence[str]) -> pd.DataFrame:
    """Rows -> DataFrame with OML dtypes: integer labels/boxes, object is_query/is_gallery (None on train rows)."""
    df = pd.DataFrame(rows, columns=list(columns))
    df[LABELS_COLUMN] = df[LABELS_COLUMN].astype("int64")
    for column in (IS_QUERY_COLUMN, IS_GALLERY_COLUMN):
        df[column] = df[column].astype(object)
    for column in BBOX_COLUMNS:
        if column in df.columns:
            df[column] = df[column].astype("int64")
    return df


def validate_dataframe(df: pd.DataFrame, dataset_root: Path, source: str = "the converted table") -> None:
    """The dataset-CSV contract (metriclab.data.contract) with the rules for a file OML's pipelines read too,
    OML's own checker included; `source` names the table (the CSV being written) in the messages."""
    try:
        validate_dataset_frame(df, source, for_oml=True, dataset_root=dataset_root)
    except ConfigError as e:
        raise ConversionError(str(e)) from e


def summarize(conversion: Conversion) -> str:
    """Images and identities/classes per split and role, then everything skipped and why."""
    df, report = conversion.df, conversion.report
    noun = report.label_noun
    is_train = df[SPLIT_COLUMN] == TRAIN
    val = df[~is_train]
    is_q, is_g = val[IS_QUERY_COLUMN].astype(bool), val[IS_GALLERY_COLUMN].astype(bool)
    groups = [("train", "-", df[is_train])]
    if len(val):
        groups.append(("validation", "query", val[is_q]))
        groups.append(("validation", "gallery", val[is_g]))
    lines = [f"{report.dataset}: {len(df):,} rows", f"  {'split':<11}{'role':<9}{'images':>9}{noun:>12}"]
    for split, role, part in groups:
        lines.append(f"  {split:<11}{role:<9}{len(part):>9,}{part[LABELS_COLUMN].nunique():>12,}")
    if len(val):
        both = int((is_q & is_g).sum())
        if both:
            lines.append(f"  ({both:,} validation images are both query and gallery; never matched with themselves)")
    lines.append("skipped:" if report.skipped else "skipped: nothing")
    for reason, items in report.skipped.items():
        lines.append(f"  {len(items):>7,}  {reason}: {list_some(items, 5)}")
    lines += [f"note: {n}" for n in report.notes]
    lines += [f"WARNING: {w}" for w in report.warnings]
    return "\n".join(lines)


def write_csv_atomically(df: pd.DataFrame, out_path: Path, dataset_root: Path) -> None:
    """Write next to the target, re-read and check it as OML will, then rename over the target."""

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            df.to_csv(f, index=False)
            f.flush()
            os.fsync(f.fileno())
        # What OML reads back is what counts (blank is_query/is_gallery on train rows, integer labels).
        validate_dataframe(pd.read_csv(tmp), dataset_root, str(out_path))

    atomic_write(out_path, write)


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("root", type=Path, help="dataset folder as downloaded; CSV paths are relative to it")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"output CSV (default: ROOT/{DEFAULT_CSV_NAME}); elsewhere, set OML's dataset_root to ROOT",
    )
    parser.add_argument("--strict", action="store_true", help="turn count mismatches and bad files into errors")
    return parser


def run_cli(
    parser: argparse.ArgumentParser,
    convert: Callable[[argparse.Namespace], Conversion],
    argv: Sequence[str] | None = None,
) -> int:
    args = parser.parse_args(argv)
    try:
        conversion = convert(args)
        out_path = args.out if args.out is not None else Path(args.root) / DEFAULT_CSV_NAME
        write_csv_atomically(conversion.df, out_path, conversion.dataset_root)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summarize(conversion))
    print(f"wrote {out_path} (dataset_root = {conversion.dataset_root})")
    return 0
