"""The dataset-CSV contract: ONE validator for OML's format, used by the reader (`metriclab.data.datasets`) and by
the converters (what they write).

Rules for every table (the reader's and the converters'):
- the columns `label, path, split, is_query, is_gallery`; at least one row;
- `split` is `train` or `validation`; `label` is an integer on every row;
- `is_query` / `is_gallery` of validation rows are True/False (also written true/1/0/...); train rows' are ignored;
- `sequence` is optional and so is each value: a row without one is its own group (`sequence_groups`), never
  grouped with the other rows without one (OML would factorize every missing value to the same group);
- a box is all four of `x_1, y_1, x_2, y_2` or none, with x_1 < x_2 and y_1 < y_2;
- a path is listed at most once as a query and once as a gallery image.
With `for_oml=True` (what a converter writes, so OML's own pipelines can read it too) also: train rows leave
`is_query`/`is_gallery` empty, every validation row is a query or a gallery image, there is a query, every query
label has a gallery image, and OML's own checker (`check_retrieval_dataframe_format`) passes.

The reader (`read_dataset_csv`) also checks every row's image file up front: it exists (one stat per row), it lies
under the dataset root unless `dataset.allow_outside_root=true`, and a path repeated within a split is warned about.

Every error is a `ConfigError` naming the file (or table), the CSV line (`row N`: the header is line 1) and the
column. Torch-free; pandas is imported by the functions that need it, so the entry points' location check is cheap.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Sequence

from metriclab.core.constants import (
    BBOX_COLUMNS,
    IS_GALLERY_COLUMN,
    IS_QUERY_COLUMN,
    LABELS_COLUMN,
    PATHS_COLUMN,
    REQUIRED_COLUMNS,
    SPLIT_COLUMN,
    SPLITS,
    TRAIN_SPLIT,
    VALIDATION_SPLIT,
    X1_COLUMN,
    X2_COLUMN,
    Y1_COLUMN,
    Y2_COLUMN,
)
from metriclab.core.errors import ConfigError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

log = logging.getLogger(__name__)

#: how True/False may be written in `is_query` / `is_gallery` (lower case)
BOOL_STRINGS: Dict[str, bool] = {"true": True, "1": True, "1.0": True, "false": False, "0": False, "0.0": False}
#: how many offending values a message lists
MAX_LISTED = 10
DEFAULT_CSV_NAME = "dataset.csv"
#: the key of `DataFrame.attrs` where `read_dataset_csv` records the CSV's path (for messages naming a row)
CSV_PATH_ATTR = "metriclab_csv_path"


def check_dataset_location(root: str | Path, csv_name: str = DEFAULT_CSV_NAME) -> Path:
    """The dataset's CSV path; a missing folder or file is an error saying what to do."""
    root = Path(str(root))
    csv_path = root / csv_name
    if not root.is_dir():
        raise ConfigError(f"dataset.root={root} is not a folder: point `dataset.root=` at the converted dataset")
    if not csv_path.is_file():
        raise ConfigError(f"{csv_path} does not exist: run a converter first (make convert-<market|cars|fruits|sop|"
                          f"inshop|cub|msmt17|cuhk03np|veri> DATA={root}) or set `dataset.csv=<name>`")
    return csv_path


def list_some(items: Sequence[Any], limit: int = MAX_LISTED) -> str:
    shown = ", ".join(str(x) for x in items[:limit])
    return shown + (f" ... and {len(items) - limit:,} more" if len(items) > limit else "")


def row_name(df: "pd.DataFrame", position: int) -> str:
    """`row N (path=...)`: N is the CSV line of the frame's `position`-th row (line 1 is the header)."""
    return f"row {position + 2} ({PATHS_COLUMN}={df[PATHS_COLUMN].iat[position]})"


def sequence_groups(values: Sequence[Any]) -> "np.ndarray":
    """`sequence` values as group names: a missing value gets a group of its own (`__row<i>`), never shared."""
    import numpy as np
    import pandas as pd

    return np.array([f"__row{i}" if pd.isna(s) else str(s) for i, s in enumerate(values)], dtype=object)


def flag_values(df: "pd.DataFrame", column: str, source: str) -> "pd.Series":
    """`is_query`/`is_gallery` as booleans: validation rows parsed (a bad value names its row), train rows False."""
    import numpy as np
    import pandas as pd

    # plain numpy arrays: pandas' per-cell .iat cost ~11 s for Market's 23k validation rows
    values = df[column].to_numpy(dtype=object)
    out = np.zeros(len(df), dtype=bool)
    is_val = (df[SPLIT_COLUMN] == VALIDATION_SPLIT).to_numpy()
    for position in np.flatnonzero(is_val):
        value = values[position]
        if isinstance(value, (bool, np.bool_)):
            out[position] = bool(value)
            continue
        key = str(value).strip().lower()
        if key not in BOOL_STRINGS:
            raise ConfigError(f"{source}: {row_name(df, position)}: `{column}` must be True/False for validation "
                              f"rows, got {value!r}")
        out[position] = BOOL_STRINGS[key]
    return pd.Series(out, index=df.index, dtype=bool)


def first_non_integer(df: "pd.DataFrame", csv_path: Optional[Path]) -> str:
    """'; row N (path=...) has VALUE' for the first `label` that is not an integer as written (the CSV text when
    there is a file: the parsed column cannot tell 1.0 from 1), or '' if every value looks like one."""
    import numpy as np
    import pandas as pd

    if csv_path is not None:
        text = pd.read_csv(csv_path, usecols=[LABELS_COLUMN], dtype=str)[LABELS_COLUMN]
    else:
        text = df[LABELS_COLUMN].astype(str)
    bad = np.flatnonzero(~text.str.fullmatch(r"\s*[+-]?\d+\s*").fillna(False).to_numpy(dtype=bool))
    if len(bad) == 0:
        return ""
    return f"; {row_name(df, int(bad[0]))} has {text.iat[int(bad[0])]!r}"


def check_columns_and_values(df: "pd.DataFrame", source: str, csv_path: Optional[Path]) -> None:
    import numpy as np
    import pandas as pd

    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ConfigError(f"{source}: missing column(s) {missing}; OML's format needs {list(REQUIRED_COLUMNS)}")
    if df.empty:
        raise ConfigError(f"{source}: no rows: the dataset holds no images")
    split_ok = df[SPLIT_COLUMN].astype(str).isin(SPLITS).to_numpy()
    if not split_ok.all():
        bad_split = sorted(set(df.loc[~split_ok, SPLIT_COLUMN].astype(str)), key=str)  # pandas 3 keeps NaN
        position = int(np.flatnonzero(~split_ok)[0])
        raise ConfigError(f"{source}: `{SPLIT_COLUMN}` must be 'train' or 'validation', found {bad_split}; first "
                          f"at {row_name(df, position)} has {df[SPLIT_COLUMN].iat[position]!r}")
    if df[LABELS_COLUMN].isna().any():
        position = int(np.flatnonzero(df[LABELS_COLUMN].isna().to_numpy())[0])
        raise ConfigError(f"{source}: {row_name(df, position)} has an empty `{LABELS_COLUMN}`")
    if not pd.api.types.is_integer_dtype(df[LABELS_COLUMN]):
        raise ConfigError(f"{source}: `{LABELS_COLUMN}` must be integers, got dtype {df[LABELS_COLUMN].dtype}"
                          f"{first_non_integer(df, csv_path)}")


def check_boxes(df: "pd.DataFrame", source: str) -> None:
    import numpy as np

    present = [c for c in BBOX_COLUMNS if c in df.columns]
    if not present:
        return
    if len(present) != len(BBOX_COLUMNS):
        raise ConfigError(f"{source}: box column(s) {[c for c in BBOX_COLUMNS if c not in present]} missing: a box "
                          f"needs all of {list(BBOX_COLUMNS)}")
    n_set = df[list(BBOX_COLUMNS)].notna().sum(axis=1).to_numpy()
    partial = np.flatnonzero((n_set > 0) & (n_set < len(BBOX_COLUMNS)))
    if len(partial):
        raise ConfigError(f"{source}: {row_name(df, int(partial[0]))}: a box needs all of {list(BBOX_COLUMNS)} or "
                          f"none (OML fails on a partial one)")
    has_box = n_set == len(BBOX_COLUMNS)
    bad = np.flatnonzero(has_box & ~((df[X1_COLUMN] < df[X2_COLUMN]) & (df[Y1_COLUMN] < df[Y2_COLUMN])).to_numpy())
    if len(bad):
        row = df.iloc[int(bad[0])]
        raise ConfigError(f"{source}: {row_name(df, int(bad[0]))}: box x_1={row[X1_COLUMN]}, y_1={row[Y1_COLUMN]}, "
                          f"x_2={row[X2_COLUMN]}, y_2={row[Y2_COLUMN]} needs x_1 < x_2 and y_1 < y_2")


def check_repeated_paths(df: "pd.DataFrame", source: str) -> None:
    is_val = df[SPLIT_COLUMN] == VALIDATION_SPLIT
    for column in (IS_QUERY_COLUMN, IS_GALLERY_COLUMN):
        paths = df.loc[is_val & df[column], PATHS_COLUMN]
        repeated = sorted(set(paths[paths.duplicated()]))
        if repeated:
            raise ConfigError(f"{source}: path(s) listed twice as {column}: {list_some(repeated)}")


def check_for_oml(raw: "pd.DataFrame", flags: "pd.DataFrame", source: str, dataset_root: Optional[Path]) -> None:
    """The rules OML's own pipelines add (see the module docstring), then OML's checker itself."""
    is_train = (raw[SPLIT_COLUMN] == TRAIN_SPLIT).to_numpy()
    for column in (IS_QUERY_COLUMN, IS_GALLERY_COLUMN):
        if raw.loc[is_train, column].notna().any():
            raise ConfigError(f"{source}: train rows must leave {column} empty")
    val = flags[~is_train]
    is_q, is_g = val[IS_QUERY_COLUMN], val[IS_GALLERY_COLUMN]
    if len(val) and not (is_q | is_g).all():
        raise ConfigError(f"{source}: some validation rows are neither query nor gallery")
    if len(val) and not is_q.any():
        raise ConfigError(f"{source}: the validation split has no query rows")
    orphans = sorted(set(val.loc[is_q, LABELS_COLUMN]) - set(val.loc[is_g, LABELS_COLUMN]))
    if orphans:
        raise ConfigError(f"{source}: query label(s) with no gallery image (OML rejects them): {list_some(orphans)}")
    from oml.utils.dataframe_format import check_retrieval_dataframe_format

    try:
        check_retrieval_dataframe_format(raw, dataset_root=dataset_root, verbose=False)
    except AssertionError as e:  # OML's checker asserts; turn it into a message a user can act on
        raise ConfigError(f"{source}: OML's format check rejected the dataframe: {str(e)[:2000]}") from e


def validate_dataset_frame(df: "pd.DataFrame", source: str, *, csv_path: Optional[Path] = None,
                           for_oml: bool = False, dataset_root: Optional[Path] = None) -> "pd.DataFrame":
    """Check `df` against the contract (`source` names it in errors: the CSV file); returns a copy with `path` as
    strings and `is_query`/`is_gallery` as booleans (False on train rows). `csv_path`: the file `df` was read from
    (its text shows a label as written); `for_oml`/`dataset_root`: the converters' stricter rules."""
    check_columns_and_values(df, source, csv_path)
    out = df.copy()
    out[PATHS_COLUMN] = out[PATHS_COLUMN].astype(str)
    for column in (IS_QUERY_COLUMN, IS_GALLERY_COLUMN):
        out[column] = flag_values(df, column, source)
    check_boxes(out, source)
    check_repeated_paths(out, source)
    if for_oml:
        check_for_oml(df, out, source, dataset_root)
    return out


def outside_root(path: str) -> bool:
    """Whether a CSV path leaves the dataset folder: absolute, or climbing out with `..`. Judged on the text, not
    the resolved file, so a dataset folder that links its images in from elsewhere keeps working."""
    norm = os.path.normpath(path)
    return os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep)


def check_paths_inside_root(df: "pd.DataFrame", root: Path, source: str) -> None:
    bad = [i for i, p in enumerate(df[PATHS_COLUMN]) if outside_root(p)]
    if bad:
        raise ConfigError(f"{source}: {row_name(df, bad[0])} points outside dataset.root={root} ({len(bad)} row(s) "
                          f"do): keep images under the root, or set `dataset.allow_outside_root=true`")


def check_image_files(df: "pd.DataFrame", root: Path, source: str, allow_outside_root: bool = False) -> None:
    """Every row's image exists (one stat per row: a bad line 362 is found now, not after an epoch) and, unless
    allowed, lies under `root`. Whether it decodes is found when it is read (`datasets.build_*_data`)."""
    if not allow_outside_root:
        check_paths_inside_root(df, root, source)
    root_text = str(root)
    missing = [i for i, p in enumerate(df[PATHS_COLUMN]) if not os.path.isfile(os.path.join(root_text, p))]
    if missing:
        raise ConfigError(f"{source}: {row_name(df, missing[0])}: image {root / df[PATHS_COLUMN].iat[missing[0]]} "
                          f"does not exist ({len(missing):,} of {len(df):,} rows' images are missing): fix or remove "
                          f"the rows, or point `dataset.root` at the folder the CSV paths are relative to")


def warn_duplicate_rows(df: "pd.DataFrame", source: str) -> int:
    """Log a warning for each split that lists an image more than once (a repeated image changes mAP and precision:
    it finds itself); returns how many repeated rows there are."""
    repeated = 0
    for split, rows in df.groupby(SPLIT_COLUMN, sort=True):
        twice = rows[PATHS_COLUMN].duplicated(keep="first").to_numpy()
        if twice.any():
            repeated += int(twice.sum())
            lines = [int(i) + 2 for i in rows.index[twice]]
            log.warning("%s: %d row(s) of split=%s repeat an earlier row's path (rows %s); each copy is a separate "
                        "image to training and metrics", source, int(twice.sum()), split, list_some(lines))
    return repeated


def read_dataset_csv(root: str | Path, csv_name: str = DEFAULT_CSV_NAME, *,
                     allow_outside_root: bool = False) -> "pd.DataFrame":
    """Read and check the dataset CSV and every row's image file; every error names the file, the row or the column
    and says what to do. The frame's index is the CSV row order (CSV line = index + 2, the datasets' error messages
    rely on it) and `attrs[CSV_PATH_ATTR]` names the file."""
    import pandas as pd

    root = Path(str(root))
    csv_path = check_dataset_location(root, csv_name)
    df = validate_dataset_frame(pd.read_csv(csv_path), str(csv_path), csv_path=csv_path).reset_index(drop=True)
    check_image_files(df, root, str(csv_path), allow_outside_root)
    warn_duplicate_rows(df, str(csv_path))
    df.attrs[CSV_PATH_ATTR] = str(csv_path)
    return df


__all__ = ["BOOL_STRINGS", "CSV_PATH_ATTR", "DEFAULT_CSV_NAME", "check_dataset_location", "check_image_files",
           "flag_values", "outside_root", "read_dataset_csv", "sequence_groups", "validate_dataset_frame",
           "warn_duplicate_rows"]
