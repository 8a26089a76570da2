"""Progress bars for the long steps (embedding, index building, conversion, re-ranking), shown only to a person.

tqdm draws the bar on stderr when stderr is a terminal; when it is not (a log file, CI, a pipe, a test) nothing is
drawn, so logs stay one line per event. `METRICLAB_PROGRESS=0` turns the bars off on a terminal too, `=1` forces
them on (e.g. to see them through `tee`).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: the environment variable that forces the bars off ("0") or on ("1"); unset = on for a terminal only
PROGRESS_ENV = "METRICLAB_PROGRESS"


def progress_enabled() -> bool:
    """Whether bars are drawn: the env switch when set, else whether stderr is a terminal."""
    forced = os.environ.get(PROGRESS_ENV)
    if forced in ("0", "1"):
        return forced == "1"
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress(iterable: Iterable[T], desc: str, total: Optional[int] = None, unit: str = "it") -> Iterator[T]:
    """`iterable` with a bar named `desc` when bars are enabled, else the iterable itself (no wrapper, no output)."""
    if not progress_enabled():
        yield from iterable
        return
    # leave=False: a finished bar disappears, the job's own summary line stays
    yield from tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True)


__all__ = ["PROGRESS_ENV", "progress", "progress_enabled"]
